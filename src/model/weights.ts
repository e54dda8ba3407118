// Loads a model's safetensors weights onto a backend, checking every tensor against the config.
// Tensors stream from the files through one staging buffer, so the file is never held in memory.
import {
  type Backend,
  type DeviceBuffer,
  DType,
  type DTypeCode,
  type Slice,
  sliceOf,
} from "../../ffi/backend.ts";
import type { ModelConfig } from "./config.ts";
import { type DType as FileDType, toF32 } from "./dtype.ts";
import { openModelWeights, readTensor, readTensorChunks, type TensorInfo } from "./safetensors.ts";

/** A tensor on the backend, in the dtype it was stored in: a range of a buffer ModelWeights owns. */
export interface Weight {
  buf: Slice;
  dtype: DTypeCode;
  shape: number[];
}

/** One decoder layer. Norm weights and biases are converted to fp32. */
export interface LayerWeights {
  attnNorm: Weight; // (dim)
  wq: Weight; // (heads * head_dim, dim)
  wk: Weight; // (kv_heads * head_dim, dim)
  wv: Weight; // (kv_heads * head_dim, dim)
  wo: Weight; // (dim, heads * head_dim)
  bq: Weight | null; // (heads * head_dim)
  bk: Weight | null; // (kv_heads * head_dim)
  bv: Weight | null; // (kv_heads * head_dim)
  bo: Weight | null; // (dim)
  ffnNorm: Weight; // (dim)
  wGate: Weight; // (hidden, dim)
  wUp: Weight; // (hidden, dim)
  wDown: Weight; // (dim, hidden)
  /** wq, wk, wv back to back ((heads + 2 kv_heads) * head_dim, dim) and their biases, and wGate,
   * wUp ((2 hidden, dim)): one GEMV each for a decode step (FUSED_GROUPS); null where the members'
   * dtypes differ (bQkv: where the model has no q/k/v biases). */
  wQkv: Weight | null;
  bQkv: Weight | null;
  wGateUp: Weight | null;
}

export interface ModelWeights {
  embed: Weight; // (vocab, dim)
  layers: LayerWeights[];
  norm: Weight; // (dim)
  lmHead: Weight; // (vocab, dim); the embedding table when tied
  /** Parameters and bytes as stored in the files. */
  params: number;
  fileBytes: number;
  /** Bytes a decode step reads from the weights (everything but the unused embedding rows). */
  decodeBytes: number;
  /** The device buffers the weights above are ranges of; freeWeights closes them. */
  buffers: DeviceBuffer[];
}

/** Each layer's tensors that a decode step multiplies by one input, stored back to back in one
 * buffer so that one GEMV reads them all: two launches (and their tails) fewer for q, k, v, one
 * for gate, up. Prefill's GEMMs take the members as ranges of that buffer. */
const FUSED_GROUPS = [
  ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
  ["mlp.gate_proj", "mlp.up_proj"],
];

/** Where the fused tensors go: each member's group (its buffer) and byte offset there, and each
 * group's bytes. A group of matrices is fused only where its members share a dtype; biases are
 * widened to fp32 on loading, so theirs always are. */
function fusedPlacements(c: ModelConfig, tensors: ReturnType<typeof matchTensors>) {
  const byName = new Map(tensors.map(([e, t]) => [e.name, { e, t }]));
  const places = new Map<string, { group: string; offset: number }>();
  const sizes = new Map<string, number>();
  for (let i = 0; i < c.numLayers; i++) {
    for (const members of FUSED_GROUPS) {
      for (const suffix of [".weight", ".bias"]) {
        const names = members.map((m) => `model.layers.${i}.${m}${suffix}`);
        const found = names.map((n) => byName.get(n));
        if (found.some((f) => !f)) continue;
        if (suffix === ".weight" && new Set(found.map((f) => f!.t.dtype)).size > 1) continue;
        const group = names.join("+");
        let offset = 0;
        names.forEach((name, j) => {
          places.set(name, { group, offset });
          offset += deviceBytesOf(found[j]!.e, found[j]!.t);
        });
        sizes.set(group, offset);
      }
    }
  }
  return { places, sizes };
}

const FILE_DTYPES: Record<string, DTypeCode> = { F32: DType.F32, F16: DType.F16, BF16: DType.BF16 };
const STAGING_BYTES = 16 << 20;

type Kind = "matrix" | "vector";
interface Expected {
  name: string;
  shape: number[];
  kind: Kind;
}

/** Every tensor the config implies, with its shape. */
export function expectedTensors(c: ModelConfig): Expected[] {
  const q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim, d = c.hiddenSize;
  const list: Expected[] = [{
    name: "model.embed_tokens.weight",
    shape: [c.vocabSize, d],
    kind: "matrix",
  }];
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}.`;
    list.push(
      { name: `${p}input_layernorm.weight`, shape: [d], kind: "vector" },
      { name: `${p}self_attn.q_proj.weight`, shape: [q, d], kind: "matrix" },
      { name: `${p}self_attn.k_proj.weight`, shape: [kv, d], kind: "matrix" },
      { name: `${p}self_attn.v_proj.weight`, shape: [kv, d], kind: "matrix" },
      { name: `${p}self_attn.o_proj.weight`, shape: [d, q], kind: "matrix" },
      { name: `${p}post_attention_layernorm.weight`, shape: [d], kind: "vector" },
      { name: `${p}mlp.gate_proj.weight`, shape: [c.intermediateSize, d], kind: "matrix" },
      { name: `${p}mlp.up_proj.weight`, shape: [c.intermediateSize, d], kind: "matrix" },
      { name: `${p}mlp.down_proj.weight`, shape: [d, c.intermediateSize], kind: "matrix" },
    );
    if (c.qkvBias) {
      list.push(
        { name: `${p}self_attn.q_proj.bias`, shape: [q], kind: "vector" },
        { name: `${p}self_attn.k_proj.bias`, shape: [kv], kind: "vector" },
        { name: `${p}self_attn.v_proj.bias`, shape: [kv], kind: "vector" },
      );
    }
    if (c.oBias) list.push({ name: `${p}self_attn.o_proj.bias`, shape: [d], kind: "vector" });
  }
  list.push({ name: "model.norm.weight", shape: [d], kind: "vector" });
  if (!c.tieWordEmbeddings) {
    list.push({ name: "lm_head.weight", shape: [c.vocabSize, d], kind: "matrix" });
  }
  return list;
}

/** Old checkpoints carry rotary buffers; they are derived from the config, so they are skipped. */
const isDerivedBuffer = (name: string) => name.endsWith(".rotary_emb.inv_freq");

/** Checks the files hold exactly the tensors the config implies; returns them in load order. */
export function matchTensors(
  dir: string,
  c: ModelConfig,
  files: Map<string, TensorInfo>,
): [Expected, TensorInfo][] {
  const expected = expectedTensors(c);
  const missing = expected.filter((e) => !files.has(e.name)).map((e) => e.name);
  if (missing.length) {
    throw new Error(`${dir}: missing tensors for ${c.architecture}: ${listNames(missing)}`);
  }
  const wanted = new Set(expected.map((e) => e.name));
  const extra = [...files.keys()].filter((n) => !wanted.has(n) && !isDerivedBuffer(n));
  if (extra.length) {
    throw new Error(`${dir}: unexpected tensors for this config: ${listNames(extra)}`);
  }
  return expected.map((e) => {
    const t = files.get(e.name)!;
    if (t.shape.join() !== e.shape.join()) {
      throw new Error(
        `${t.file}: tensor ${e.name} has shape [${t.shape}], config implies [${e.shape}]`,
      );
    }
    if (!(t.dtype in FILE_DTYPES)) {
      throw new Error(`${t.file}: tensor ${e.name} is ${t.dtype}; supported: F32, F16, BF16`);
    }
    return [e, t];
  });
}

function listNames(names: string[]): string {
  return names.length <= 5
    ? names.join(", ")
    : `${names.slice(0, 5).join(", ")} and ${names.length - 5} more`;
}

export type LoadProgress = (doneBytes: number, totalBytes: number) => void;

/** Device memory the caller will need beside the weights (KV cache, activations), for the
 * up-front check; `what` says what it is in the error. */
export interface Reserve {
  bytes: number;
  what: string;
}

/** Bytes as GiB with two decimals, for memory messages. */
export const gib = (bytes: number): string => `${(bytes / 2 ** 30).toFixed(2)} GiB`;

/** The dtype every decoder layer's linear weight (q, k, v, o, gate, up, down) is stored in, or
 * null when they differ. */
export function layerMatrixDtype(tensors: ReturnType<typeof matchTensors>): DTypeCode | null {
  const dtypes = new Set(
    tensors.filter(([e]) => e.kind === "matrix" && e.name.startsWith("model.layers."))
      .map(([, t]) => FILE_DTYPES[t.dtype]),
  );
  return dtypes.size === 1 ? [...dtypes][0] : null;
}

/** Bytes the matched tensors take on the device: matrices as stored, vectors widened to fp32. */
export function deviceWeightBytes(tensors: ReturnType<typeof matchTensors>): number {
  return tensors.reduce((sum, [e, t]) => sum + deviceBytesOf(e, t), 0);
}

function deviceBytesOf(e: Expected, t: TensorInfo): number {
  return e.kind === "matrix" ? t.bytes : t.shape.reduce((a, b) => a * b, 1) * 4;
}

/** DIR's tensors, checked against the config (matchTensors), in load order. */
export async function readTensors(
  dir: string,
  c: ModelConfig,
): Promise<ReturnType<typeof matchTensors>> {
  return matchTensors(dir, c, await openModelWeights(dir));
}

/** Loads DIR's weights (its `tensors`, from readTensors) onto the backend. On failure every buffer
 * made so far is freed. On a GPU, weights plus `reserve` are checked against free memory first, so
 * a model that cannot fit fails at once with the numbers, not after minutes of loading. */
export async function loadWeights(
  backend: Backend,
  dir: string,
  c: ModelConfig,
  tensors: ReturnType<typeof matchTensors>,
  onProgress: LoadProgress = () => {},
  reserve: Reserve = { bytes: 0, what: "nothing else" },
): Promise<ModelWeights> {
  const totalBytes = tensors.reduce((sum, [, t]) => sum + t.bytes, 0);
  const deviceBytes = deviceWeightBytes(tensors);
  if (backend.kind === "cuda") { // host memory is paged and overcommitted: no such check on the CPU
    const { name, freeBytes } = backend.deviceInfo();
    if (deviceBytes + reserve.bytes > freeBytes) {
      throw new Error(
        `${dir}: needs ${gib(deviceBytes + reserve.bytes)} on ${name} (weights ${
          gib(deviceBytes)
        }, ` +
          `${reserve.what}) but ${gib(freeBytes)} is free: lower --ctx or use a smaller model`,
      );
    }
  }
  const { places, sizes } = fusedPlacements(c, tensors);
  const buffers: DeviceBuffer[] = [], groups = new Map<string, DeviceBuffer>();
  const alloc = (bytes: number) => {
    const b = backend.alloc(Math.max(bytes, 1));
    buffers.push(b);
    return b;
  };
  const loaded = new Map<string, Weight>();
  let doneBytes = 0;
  try {
    for (const [e, t] of tensors) {
      const place = places.get(e.name), bytes = deviceBytesOf(e, t);
      let into: Slice;
      if (place) {
        let g = groups.get(place.group);
        if (!g) groups.set(place.group, g = alloc(sizes.get(place.group)!));
        into = g.slice(place.offset, bytes);
      } else {
        into = alloc(bytes);
      }
      loaded.set(
        e.name,
        e.kind === "matrix"
          ? await uploadMatrix(backend, t, into)
          : await uploadVector(backend, t, into),
      );
      doneBytes += t.bytes;
      onProgress(doneBytes, totalBytes);
    }
  } catch (err) {
    for (const b of buffers) b.close();
    throw err;
  }
  const get = (name: string) => loaded.get(name)!;
  const opt = (name: string) => loaded.get(name) ?? null;
  /** The group of `members` (FUSED_GROUPS) as one weight, rows stacked, or null if not fused. */
  const fused = (p: string, members: string[], suffix: string): Weight | null => {
    const names = members.map((m) => `${p}${m}${suffix}`);
    const buf = groups.get(names.join("+"));
    if (!buf) return null;
    const first = get(names[0]);
    const rows = names.reduce((sum, n) => sum + get(n).shape[0], 0);
    return { buf, dtype: first.dtype, shape: [rows, ...first.shape.slice(1)] };
  };
  const layers = Array.from({ length: c.numLayers }, (_, i): LayerWeights => {
    const p = `model.layers.${i}.`;
    return {
      wQkv: fused(p, FUSED_GROUPS[0], ".weight"),
      bQkv: fused(p, FUSED_GROUPS[0], ".bias"),
      wGateUp: fused(p, FUSED_GROUPS[1], ".weight"),
      attnNorm: get(`${p}input_layernorm.weight`),
      wq: get(`${p}self_attn.q_proj.weight`),
      wk: get(`${p}self_attn.k_proj.weight`),
      wv: get(`${p}self_attn.v_proj.weight`),
      wo: get(`${p}self_attn.o_proj.weight`),
      bq: opt(`${p}self_attn.q_proj.bias`),
      bk: opt(`${p}self_attn.k_proj.bias`),
      bv: opt(`${p}self_attn.v_proj.bias`),
      bo: opt(`${p}self_attn.o_proj.bias`),
      ffnNorm: get(`${p}post_attention_layernorm.weight`),
      wGate: get(`${p}mlp.gate_proj.weight`),
      wUp: get(`${p}mlp.up_proj.weight`),
      wDown: get(`${p}mlp.down_proj.weight`),
    };
  });
  const embed = get("model.embed_tokens.weight");
  const lmHead = c.tieWordEmbeddings ? embed : get("lm_head.weight");
  const params = tensors.reduce((sum, [, t]) => sum + t.shape.reduce((a, b) => a * b, 1), 0);
  const embedBytes = tensors[0][1].bytes;
  return {
    embed,
    layers,
    norm: get("model.norm.weight"),
    lmHead,
    params,
    fileBytes: totalBytes,
    decodeBytes: c.tieWordEmbeddings ? totalBytes : totalBytes - embedBytes,
    buffers,
  };
}

/** Frees every buffer of a model's weights. */
export function freeWeights(w: ModelWeights): void {
  for (const b of w.buffers) b.close();
}

/** Streams matrix t, as stored, into `buf` (its device bytes). */
async function uploadMatrix(backend: Backend, t: TensorInfo, buf: Slice): Promise<Weight> {
  await readTensorChunks(
    t,
    STAGING_BYTES,
    (chunk, offset) => backend.upload(sliceOf(buf, offset, chunk.length), chunk),
  );
  return { buf, dtype: FILE_DTYPES[t.dtype], shape: t.shape };
}

/** Vector t, widened to fp32, into `buf`. */
async function uploadVector(backend: Backend, t: TensorInfo, buf: Slice): Promise<Weight> {
  backend.upload(buf, toF32(await readTensor(t), t.dtype as FileDType));
  return { buf, dtype: DType.F32, shape: t.shape };
}
