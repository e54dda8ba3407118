// Reads safetensors files, which are untrusted input: every header field is checked before use,
// and tensor data is streamed, never loaded whole.
import { join } from "node:path";
import { dtypeBytes, isSafetensorsDType, type SafetensorsDType } from "./dtype.ts";

export interface TensorInfo {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Path of the file holding the data. */
  file: string;
  /** Absolute byte offset of the data in `file`. */
  offset: number;
  bytes: number;
}

export interface SafetensorsFile {
  path: string;
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

export const SINGLE_FILE_NAME = "model.safetensors";
export const INDEX_FILE_NAME = "model.safetensors.index.json";

const HEADER_LENGTH_BYTES = 8;
const MIN_HEADER_BYTES = 2; // "{}"
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
const METADATA_KEY = "__metadata__";

/** Opens a safetensors file and validates its header against the file size. */
export async function openSafetensors(path: string): Promise<SafetensorsFile> {
  using file = await Deno.open(path);
  const fileSize = (await file.stat()).size;
  if (fileSize < HEADER_LENGTH_BYTES) {
    throw new Error(`${path}: file is ${fileSize} bytes, too short for the 8-byte header length`);
  }
  const headerBytes = await readHeaderBytes(file, path, fileSize);
  const header = parseHeader(headerBytes, path);
  const dataStart = HEADER_LENGTH_BYTES + headerBytes.length;
  const dataSize = fileSize - dataStart;

  let metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  for (const [name, entry] of Object.entries(header)) {
    if (name === METADATA_KEY) {
      metadata = validateMetadata(entry, path);
    } else {
      tensors.set(name, validateTensorEntry(name, entry, path, dataStart, dataSize));
    }
  }
  checkNoOverlap(tensors, path, dataStart);
  return { path, tensors, metadata };
}

async function readHeaderBytes(file: Deno.FsFile, path: string, fileSize: number) {
  const lengthBytes = new Uint8Array(HEADER_LENGTH_BYTES);
  await readFully(file, lengthBytes, path, "the header length");
  // Read as u64 so a hostile length such as 2^63 is reported as is, not wrapped.
  const length = new DataView(lengthBytes.buffer).getBigUint64(0, true);
  if (length < MIN_HEADER_BYTES || length > MAX_HEADER_BYTES) {
    throw new Error(
      `${path}: header length ${length} is outside ${MIN_HEADER_BYTES}..${MAX_HEADER_BYTES} bytes`,
    );
  }
  if (HEADER_LENGTH_BYTES + Number(length) > fileSize) {
    throw new Error(
      `${path}: header length ${length} runs past the end of the file (${fileSize} bytes)`,
    );
  }
  const headerBytes = new Uint8Array(Number(length));
  await readFully(file, headerBytes, path, "the header");
  return headerBytes;
}

function parseHeader(headerBytes: Uint8Array, path: string): Record<string, unknown> {
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
  } catch (cause) {
    throw new Error(`${path}: header is not valid UTF-8 JSON (${errorMessage(cause)})`, {
      cause,
    });
  }
  if (!isPlainObject(header)) {
    throw new Error(`${path}: header must be a JSON object, got ${describeJsonType(header)}`);
  }
  return header;
}

function validateMetadata(entry: unknown, path: string): Record<string, string> {
  if (!isPlainObject(entry) || !Object.values(entry).every((v) => typeof v === "string")) {
    throw new Error(`${path}: "${METADATA_KEY}" must be an object of string values`);
  }
  return entry as Record<string, string>;
}

function validateTensorEntry(
  name: string,
  entry: unknown,
  path: string,
  dataStart: number,
  dataSize: number,
): TensorInfo {
  const where = `${path}: tensor ${JSON.stringify(name)}`;
  if (!isPlainObject(entry)) {
    throw new Error(`${where} must be an object, got ${describeJsonType(entry)}`);
  }
  const { dtype, shape, data_offsets: offsets } = entry;
  if (typeof dtype !== "string") throw new Error(`${where} dtype must be a string`);
  if (!isSafetensorsDType(dtype)) {
    throw new Error(`${where} has unknown dtype ${truncatedJson(dtype)}`);
  }
  if (!Array.isArray(shape) || !shape.every(isNonNegativeSafeInteger)) {
    throw new Error(
      `${where} shape ${truncatedJson(shape)} must be an array of non-negative integers`,
    );
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeSafeInteger)) {
    throw new Error(
      `${where} data_offsets ${truncatedJson(offsets)} must be [begin, end] non-negative integers`,
    );
  }
  const [begin, end] = offsets;
  const offsetsText = `data_offsets [${begin}, ${end}]`;
  if (begin > end) throw new Error(`${where} ${offsetsText} begin is after end`);
  if (end > dataSize) {
    throw new Error(`${where} ${offsetsText} end past the data section (${dataSize} bytes)`);
  }
  const expectedBytes = shape.reduce((product, dim) => product * dim, 1) * dtypeBytes(dtype);
  if (end - begin !== expectedBytes) {
    throw new Error(
      `${where} ${offsetsText} hold ${end - begin} bytes, but shape [${shape.join(", ")}] ` +
        `of ${dtype} needs ${expectedBytes}`,
    );
  }
  return { name, dtype, shape, file: path, offset: dataStart + begin, bytes: end - begin };
}

function checkNoOverlap(tensors: Map<string, TensorInfo>, path: string, dataStart: number) {
  // Zero-size tensors occupy no bytes, so they cannot overlap anything.
  const byOffset = [...tensors.values()].filter((t) => t.bytes > 0)
    .sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < byOffset.length; i++) {
    const previous = byOffset[i - 1];
    const current = byOffset[i];
    if (previous.offset + previous.bytes > current.offset) {
      throw new Error(
        `${path}: tensors ${JSON.stringify(previous.name)} ${rangeText(previous, dataStart)} ` +
          `and ${JSON.stringify(current.name)} ${rangeText(current, dataStart)} overlap`,
      );
    }
  }
}

/** A tensor's byte range as its data_offsets, i.e. relative to the data section. */
function rangeText(tensor: TensorInfo, dataStart: number): string {
  const begin = tensor.offset - dataStart;
  return `[${begin}, ${begin + tensor.bytes}]`;
}

/** Finds a model's weights in `dir`: a sharded index if present, else a single file. */
export async function openModelWeights(dir: string): Promise<Map<string, TensorInfo>> {
  const indexPath = join(dir, INDEX_FILE_NAME);
  if (await fileExists(indexPath)) return await openShardedWeights(dir, indexPath);
  const singlePath = join(dir, SINGLE_FILE_NAME);
  if (await fileExists(singlePath)) return (await openSafetensors(singlePath)).tensors;
  throw new Error(`${dir}: found neither ${INDEX_FILE_NAME} nor ${SINGLE_FILE_NAME}`);
}

async function openShardedWeights(
  dir: string,
  indexPath: string,
): Promise<Map<string, TensorInfo>> {
  const shardOf = await readWeightMap(indexPath);
  const tensors = new Map<string, TensorInfo>();
  for (const shard of new Set(shardOf.values())) {
    const shardPath = join(dir, shard);
    if (!(await fileExists(shardPath))) {
      throw new Error(`${indexPath}: shard ${JSON.stringify(shard)} does not exist in ${dir}`);
    }
    for (const [name, info] of (await openSafetensors(shardPath)).tensors) {
      // Also catches a tensor stored in two shards: only one of them is the index's.
      const listedShard = shardOf.get(name);
      if (listedShard !== shard) {
        const listing = listedShard === undefined
          ? "which the index does not list"
          : `which the index places in ${JSON.stringify(listedShard)}`;
        throw new Error(
          `${indexPath}: shard ${JSON.stringify(shard)} holds tensor ${JSON.stringify(name)}, ` +
            listing,
        );
      }
      tensors.set(name, info);
    }
  }
  for (const [name, shard] of shardOf) {
    if (!tensors.has(name)) {
      throw new Error(
        `${indexPath}: tensor ${JSON.stringify(name)} is missing from its shard ` +
          JSON.stringify(shard),
      );
    }
  }
  return tensors;
}

/** Reads an index's weight_map: tensor name -> shard file name in the same directory. */
async function readWeightMap(indexPath: string): Promise<Map<string, string>> {
  let index: unknown;
  try {
    index = JSON.parse(await Deno.readTextFile(indexPath));
  } catch (cause) {
    throw new Error(`${indexPath}: not valid JSON (${errorMessage(cause)})`, { cause });
  }
  if (!isPlainObject(index) || !isPlainObject(index.weight_map)) {
    throw new Error(`${indexPath}: expected a JSON object with a "weight_map" object`);
  }
  const shardOf = new Map<string, string>();
  for (const [name, shard] of Object.entries(index.weight_map)) {
    if (typeof shard !== "string" || !isPlainFileName(shard)) {
      throw new Error(
        `${indexPath}: weight_map entry for ${JSON.stringify(name)} is ${truncatedJson(shard)}, ` +
          `expected a plain file name (no "/" or "..")`,
      );
    }
    shardOf.set(name, shard);
  }
  return shardOf;
}

/** True for a name that stays inside the index's directory. */
function isPlainFileName(name: string): boolean {
  return name !== "" && !["/", "\\", "\0", ".."].some((part) => name.includes(part));
}

/** Streams a tensor's bytes through one reused buffer of at most `chunkBytes`.
 * The array passed to `onChunk` is only valid until the call returns (or its promise settles). */
export async function readTensorChunks(
  info: TensorInfo,
  chunkBytes: number,
  onChunk: (bytes: Uint8Array, offsetInTensor: number) => void | Promise<void>,
): Promise<void> {
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes <= 0) {
    throw new Error(`readTensorChunks: chunkBytes must be a positive integer, got ${chunkBytes}`);
  }
  using file = await Deno.open(info.file);
  await file.seek(info.offset, Deno.SeekMode.Start);
  const buffer = new Uint8Array(Math.min(chunkBytes, info.bytes));
  for (let done = 0; done < info.bytes;) {
    const chunk = buffer.subarray(0, Math.min(buffer.length, info.bytes - done));
    await readFully(file, chunk, info.file, `tensor ${JSON.stringify(info.name)}`);
    await onChunk(chunk, done);
    done += chunk.length;
  }
}

/** Reads a whole tensor into memory; for small tensors only. */
export async function readTensor(info: TensorInfo): Promise<Uint8Array> {
  using file = await Deno.open(info.file);
  await file.seek(info.offset, Deno.SeekMode.Start);
  const bytes = new Uint8Array(info.bytes);
  await readFully(file, bytes, info.file, `tensor ${JSON.stringify(info.name)}`);
  return bytes;
}

/** Fills `into` from the current position; a read may return fewer bytes than asked. */
async function readFully(file: Deno.FsFile, into: Uint8Array, path: string, what: string) {
  for (let filled = 0; filled < into.length;) {
    const n = await file.read(into.subarray(filled));
    if (n === null) {
      throw new Error(
        `${path}: unexpected end of file reading ${what} (got ${filled} of ${into.length} bytes)`,
      );
    }
    filled += n;
  }
}

async function fileExists(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (cause) {
    if (cause instanceof Deno.errors.NotFound) return false;
    throw cause;
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isNonNegativeSafeInteger(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

function describeJsonType(value: unknown): string {
  if (value === null) return "null";
  return Array.isArray(value) ? "an array" : `a ${typeof value}`;
}

/** JSON for an untrusted value in a one-line message, cut short if long. */
function truncatedJson(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

/** An error's message on one line (JSON.parse quotes the offending text, newlines and all). */
function errorMessage(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).replace(/\s+/g, " ");
}
