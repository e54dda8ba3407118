// Writes safetensors files, single or sharded in the Hugging Face layout, one tensor at a time.
import { join } from "node:path";
import { dtypeBytes, isSafetensorsDType, type SafetensorsDType } from "./dtype.ts";
import { INDEX_FILE_NAME } from "./safetensors.ts";

export interface TensorToWrite {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  data: Uint8Array;
}

const HEADER_ALIGNMENT = 8;
const METADATA_KEY = "__metadata__";

/** Writes one safetensors file: tensors in the given order, contiguous. */
export async function writeSafetensors(
  path: string,
  tensors: TensorToWrite[],
  metadata?: Record<string, string>,
): Promise<void> {
  const header = encodeHeader(tensors, metadata, path);
  const headerLength = new Uint8Array(8);
  new DataView(headerLength.buffer).setBigUint64(0, BigInt(header.length), true);

  using file = await Deno.open(path, { write: true, create: true, truncate: true });
  await writeFully(file, headerLength);
  await writeFully(file, header);
  for (const tensor of tensors) await writeFully(file, tensor.data);
}

/** The header JSON, space-padded so the data section starts 8-byte aligned. */
function encodeHeader(
  tensors: TensorToWrite[],
  metadata: Record<string, string> | undefined,
  path: string,
): Uint8Array {
  // Entries, not assignments: a tensor named "__proto__" must become a key, not a prototype.
  const entries: [string, unknown][] = metadata ? [[METADATA_KEY, metadata]] : [];
  const names = new Set<string>();
  let offset = 0;
  for (const tensor of tensors) {
    checkTensor(tensor, names, path);
    names.add(tensor.name);
    const end = offset + tensor.data.length;
    entries.push([tensor.name, {
      dtype: tensor.dtype,
      shape: tensor.shape,
      data_offsets: [offset, end],
    }]);
    offset = end;
  }
  const header = Object.fromEntries(entries);
  const json = new TextEncoder().encode(JSON.stringify(header));
  const padded = new Uint8Array(Math.ceil(json.length / HEADER_ALIGNMENT) * HEADER_ALIGNMENT);
  padded.fill(0x20); // space
  padded.set(json);
  return padded;
}

/** Rejects what the reader would reject, so a bad file is never written. */
function checkTensor(tensor: TensorToWrite, earlierNames: Set<string>, path: string) {
  const where = `${path}: tensor ${JSON.stringify(tensor.name)}`;
  if (tensor.name === METADATA_KEY) throw new Error(`${where} uses the reserved metadata key`);
  if (earlierNames.has(tensor.name)) throw new Error(`${where} is given twice`);
  if (!isSafetensorsDType(tensor.dtype)) throw new Error(`${where} has unknown dtype`);
  if (!tensor.shape.every((dim) => Number.isSafeInteger(dim) && dim >= 0)) {
    throw new Error(`${where} shape [${tensor.shape}] must be non-negative integers`);
  }
  const expectedBytes = tensor.shape.reduce((product, dim) => product * dim, 1) *
    dtypeBytes(tensor.dtype);
  if (tensor.data.length !== expectedBytes) {
    throw new Error(
      `${where} has ${tensor.data.length} bytes, but shape [${tensor.shape.join(", ")}] ` +
        `of ${tensor.dtype} needs ${expectedBytes}`,
    );
  }
}

/** Splits tensors over `shards` files model-0000i-of-0000n.safetensors (balanced by bytes,
 * order kept) and writes model.safetensors.index.json naming each tensor's file. */
export async function writeShardedSafetensors(
  dir: string,
  tensors: TensorToWrite[],
  shards: number,
): Promise<void> {
  if (!Number.isSafeInteger(shards) || shards < 1 || shards > tensors.length) {
    throw new Error(`${dir}: cannot split ${tensors.length} tensors into ${shards} shards`);
  }
  const weightMap = new Map<string, string>();
  const groups = splitIntoShards(tensors, shards);
  for (const [i, group] of groups.entries()) {
    const fileName = shardFileName(i + 1, shards);
    await writeSafetensors(join(dir, fileName), group);
    for (const tensor of group) weightMap.set(tensor.name, fileName);
  }
  const totalSize = tensors.reduce((sum, tensor) => sum + tensor.data.length, 0);
  const index = { metadata: { total_size: totalSize }, weight_map: sortedByKey(weightMap) };
  await Deno.writeTextFile(join(dir, INDEX_FILE_NAME), JSON.stringify(index, null, 2) + "\n");
}

function shardFileName(shard: number, shards: number): string {
  const pad = (n: number) => String(n).padStart(5, "0");
  return `model-${pad(shard)}-of-${pad(shards)}.safetensors`;
}

/** Contiguous groups of roughly total/shards bytes each; every group gets at least one tensor. */
function splitIntoShards(tensors: TensorToWrite[], shards: number): TensorToWrite[][] {
  const totalBytes = tensors.reduce((sum, tensor) => sum + tensor.data.length, 0);
  const groups: TensorToWrite[][] = [[]];
  let bytesBefore = 0;
  for (const [i, tensor] of tensors.entries()) {
    const current = groups[groups.length - 1];
    const shardsLeft = shards - groups.length;
    const currentIsFull = bytesBefore >= (totalBytes * groups.length) / shards;
    const mustStartNew = tensors.length - i === shardsLeft;
    if (current.length > 0 && shardsLeft > 0 && (currentIsFull || mustStartNew)) groups.push([]);
    groups[groups.length - 1].push(tensor);
    bytesBefore += tensor.data.length;
  }
  return groups;
}

// Hugging Face writes weight_map sorted by tensor name.
function sortedByKey(map: Map<string, string>): Record<string, string> {
  return Object.fromEntries([...map].sort(([a], [b]) => (a < b ? -1 : 1)));
}

/** A write may take fewer bytes than given. */
async function writeFully(file: Deno.FsFile, bytes: Uint8Array) {
  for (let written = 0; written < bytes.length;) {
    written += await file.write(bytes.subarray(written));
  }
}
