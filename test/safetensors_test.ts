import assert from "node:assert/strict";
import { join } from "node:path";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, toF32 } from "../src/model/dtype.ts";
import {
  openModelWeights,
  openSafetensors,
  readTensor,
  readTensorChunks,
  type TensorInfo,
} from "../src/model/safetensors.ts";
import {
  type TensorToWrite,
  writeSafetensors,
  writeShardedSafetensors,
} from "../src/model/safetensors_writer.ts";

// ---------------------------------------------------------------------------------------------
// Helpers

async function withTempDir(body: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "innerq_safetensors_test_" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Deterministic, distinct bytes so misplaced data shows up. */
function patternBytes(length: number, seed: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (i * 31 + seed * 17) & 0xff);
}

function sampleTensors(): TensorToWrite[] {
  return [
    { name: "model.embed_tokens.weight", dtype: "BF16", shape: [8, 4], data: patternBytes(64, 1) },
    { name: "model.norm.weight", dtype: "F32", shape: [4], data: patternBytes(16, 2) },
    { name: "empty", dtype: "F16", shape: [0, 3], data: new Uint8Array(0) },
    { name: "lm_head.weight", dtype: "F16", shape: [3, 5], data: patternBytes(30, 3) },
    { name: "scalar", dtype: "F32", shape: [], data: patternBytes(4, 4) },
  ];
}

/** Reassembles a tensor through readTensorChunks, checking each chunk's size and offset. */
async function readByChunks(info: TensorInfo, chunkBytes: number): Promise<Uint8Array> {
  const out = new Uint8Array(info.bytes);
  let expectedOffset = 0;
  await readTensorChunks(info, chunkBytes, (chunk, offset) => {
    assert.ok(chunk.length > 0 && chunk.length <= chunkBytes);
    assert.equal(offset, expectedOffset);
    out.set(chunk, offset);
    expectedOffset += chunk.length;
  });
  assert.equal(expectedOffset, info.bytes);
  return out;
}

async function assertTensorsMatch(found: Map<string, TensorInfo>, expected: TensorToWrite[]) {
  assert.deepEqual([...found.keys()].sort(), expected.map((t) => t.name).sort());
  for (const tensor of expected) {
    const info = found.get(tensor.name)!;
    assert.equal(info.dtype, tensor.dtype);
    assert.deepEqual(info.shape, tensor.shape);
    assert.equal(info.bytes, tensor.data.length);
    assert.deepEqual(await readTensor(info), tensor.data);
    assert.deepEqual(await readByChunks(info, 7), tensor.data);
  }
}

/** A safetensors file from a raw header (object, or exact text) and `dataBytes` of data. */
function rawSafetensors(header: unknown, dataBytes: number): Uint8Array {
  const headerText = typeof header === "string" ? header : JSON.stringify(header);
  const headerBytes = new TextEncoder().encode(headerText);
  const file = new Uint8Array(8 + headerBytes.length + dataBytes);
  new DataView(file.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  file.set(headerBytes, 8);
  return file;
}

/** Asserts that `action` rejects with an Error whose message matches `message`. */
async function assertRejectsWithMessage(action: () => Promise<unknown>, message: RegExp) {
  await assert.rejects(action, (e: Error) => {
    assert.match(e.message, message);
    return true;
  });
}

/** Writes `bytes` as model.safetensors and asserts that opening it fails with `message`. */
async function assertRejected(bytes: Uint8Array, message: RegExp) {
  await withTempDir(async (dir) => {
    const path = join(dir, "model.safetensors");
    await Deno.writeFile(path, bytes);
    await assert.rejects(() => openSafetensors(path), (e: Error) => {
      assert.ok(e.message.startsWith(`${path}: `), `message names the file: ${e.message}`);
      assert.match(e.message, message);
      assert.ok(!e.message.includes("\n"), `message is one line: ${e.message}`);
      return true;
    });
  });
}

const f32Entry = (name: string, shape: unknown, offsets: unknown) => ({
  [name]: { dtype: "F32", shape, data_offsets: offsets },
});

// ---------------------------------------------------------------------------------------------
// Round trips

Deno.test("writeSafetensors then openSafetensors round-trips tensors and metadata", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "model.safetensors");
    const tensors = sampleTensors();
    const metadata = { format: "pt", note: "round trip" };
    await writeSafetensors(path, tensors, metadata);

    const bytes = await Deno.readFile(path);
    const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    assert.equal(headerLength % 8, 0, "header is padded to 8 bytes");
    const dataBytes = tensors.reduce((sum, t) => sum + t.data.length, 0);
    assert.equal(bytes.length, 8 + headerLength + dataBytes, "tensors are contiguous");

    const file = await openSafetensors(path);
    assert.equal(file.path, path);
    assert.deepEqual(file.metadata, metadata);
    await assertTensorsMatch(file.tensors, tensors);
    assert.equal(file.tensors.get("model.embed_tokens.weight")!.offset, 8 + headerLength);
  });
});

Deno.test("openModelWeights reads a single model.safetensors", async () => {
  await withTempDir(async (dir) => {
    const tensors = sampleTensors();
    await writeSafetensors(join(dir, "model.safetensors"), tensors);
    await assertTensorsMatch(await openModelWeights(dir), tensors);
  });
});

Deno.test("writeShardedSafetensors then openModelWeights round-trips a sharded model", async () => {
  await withTempDir(async (dir) => {
    const tensors = sampleTensors();
    await writeShardedSafetensors(dir, tensors, 3);

    const shardNames = [1, 2, 3].map((i) => `model-0000${i}-of-00003.safetensors`);
    const index = JSON.parse(await Deno.readTextFile(join(dir, "model.safetensors.index.json")));
    const totalSize = tensors.reduce((sum, t) => sum + t.data.length, 0);
    assert.equal(index.metadata.total_size, totalSize);
    assert.deepEqual(Object.keys(index.weight_map), tensors.map((t) => t.name).sort());
    assert.deepEqual(new Set(Object.values(index.weight_map)), new Set(shardNames));

    const weights = await openModelWeights(dir);
    await assertTensorsMatch(weights, tensors);
    for (const [name, info] of weights) assert.equal(info.file, join(dir, index.weight_map[name]));
  });
});

Deno.test("readTensorChunks reports a file truncated after it was opened", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "model.safetensors");
    await writeSafetensors(path, sampleTensors());
    const info = (await openSafetensors(path)).tensors.get("lm_head.weight")!;
    await Deno.truncate(path, info.offset + 10);
    await assertRejectsWithMessage(
      () => readTensorChunks(info, 4, () => {}),
      new RegExp(`^${RegExp.escape(path)}: unexpected end of file reading tensor "lm_head.weight"`),
    );
  });
});

// ---------------------------------------------------------------------------------------------
// dtype conversions

const bits16 = (values: number[]) => Uint16Array.from(values);

Deno.test("bf16 round-trips exactly representable values", () => {
  const values = Float32Array.from([
    0,
    -0,
    1,
    -2.5,
    3.140625,
    65536,
    2 ** -126, // smallest normal
    2 ** -133, // subnormal
    Infinity,
    -Infinity,
  ]);
  assert.deepEqual(bf16ToF32(f32ToBf16(values)), values);
  assert.deepEqual(f32ToBf16(Float32Array.from([1, -2])), bits16([0x3f80, 0xc000]));
});

Deno.test("f32ToBf16 rounds to nearest, ties to even, and keeps NaN", () => {
  const fromBits = (bits: number[]) => new Float32Array(Uint32Array.from(bits).buffer);
  const rounded = f32ToBf16(fromBits([
    0x3f808000, // tie, even below: stays 0x3f80
    0x3f818000, // tie, odd below: up to 0x3f82
    0x3f808001, // just above the tie: up
    0x3f807fff, // just below the tie: down
    0x7f7fffff, // largest f32 rounds up to infinity
    0x7f800001, // NaN whose payload is only in the low half
    0xffc00000, // negative quiet NaN
  ]));
  assert.deepEqual(rounded.subarray(0, 5), bits16([0x3f80, 0x3f82, 0x3f81, 0x3f80, 0x7f80]));
  assert.ok(Number.isNaN(bf16ToF32(rounded.subarray(5, 6))[0]));
  assert.equal(rounded[6], 0xffc0);
});

Deno.test("f16 round-trips exactly representable values", () => {
  const values = Float32Array.from([0, -0, 1, -2.5, 0.333251953125, 65504, -65504, 2 ** -14]);
  assert.deepEqual(f16ToF32(f32ToF16(values)), values);
  assert.deepEqual(f32ToF16(Float32Array.from([1, -2, 65504])), bits16([0x3c00, 0xc000, 0x7bff]));
});

Deno.test("f32ToF16 rounds to nearest, ties to even, and overflows to infinity", () => {
  const ulpAtOne = 2 ** -10;
  const rounded = f32ToF16(Float32Array.from([
    1 + ulpAtOne / 2, // tie, even below: 1
    1 + 1.5 * ulpAtOne, // tie, odd below: up to 1 + 2 ulp
    1 + ulpAtOne / 2 + 2 ** -20, // just above the tie: up
    65519, // below the halfway point to 65536: largest finite
    65520, // halfway to 65536 (the next power, beyond range): infinity
    -1e6,
  ]));
  assert.deepEqual(rounded, bits16([0x3c00, 0x3c02, 0x3c01, 0x7bff, 0x7c00, 0xfc00]));
});

Deno.test("f16 handles subnormals, infinities and NaN", () => {
  const smallest = 2 ** -24;
  const halves = f32ToF16(Float32Array.from([
    smallest,
    1023 * smallest, // largest subnormal
    3 * smallest, // exact subnormal
    smallest / 2, // tie with zero: rounds to even (zero)
    1.5 * smallest, // tie between 1 and 2 ulp: to even (2)
    smallest / 4, // underflows to zero
    -smallest,
    Infinity,
    -Infinity,
    NaN,
  ]));
  assert.deepEqual(
    halves.subarray(0, 9),
    bits16([0x0001, 0x03ff, 0x0003, 0x0000, 0x0002, 0x0000, 0x8001, 0x7c00, 0xfc00]),
  );
  assert.equal(halves[9] & 0x7c00, 0x7c00);
  assert.notEqual(halves[9] & 0x03ff, 0);

  const back = f16ToF32(bits16([0x0001, 0x03ff, 0x8001, 0x7c00, 0xfc00, 0x7e00]));
  assert.deepEqual(
    back.subarray(0, 5),
    Float32Array.from([smallest, 1023 * smallest, -smallest, Infinity, -Infinity]),
  );
  assert.ok(Number.isNaN(back[5]));
});

Deno.test("toF32 decodes little-endian bytes from an unaligned view", () => {
  const unaligned = (bytes: number[]) => new Uint8Array([0xee, ...bytes]).subarray(1);
  assert.deepEqual(toF32(unaligned([0x00, 0x00, 0xc0, 0x3f]), "F32"), Float32Array.from([1.5]));
  assert.deepEqual(toF32(unaligned([0x00, 0x3e, 0x00, 0xc0]), "F16"), Float32Array.from([1.5, -2]));
  assert.deepEqual(
    toF32(unaligned([0xc0, 0x3f, 0x00, 0xc0]), "BF16"),
    Float32Array.from([1.5, -2]),
  );
  assert.throws(() => toF32(new Uint8Array(3), "F16"), /3 bytes is not a whole number of F16/);
});

// ---------------------------------------------------------------------------------------------
// Hostile files

Deno.test("rejects a file shorter than the 8-byte header length", async () => {
  await assertRejected(new Uint8Array(5), /file is 5 bytes, too short for the 8-byte header/);
});

Deno.test("rejects a header length past the end of the file", async () => {
  const file = rawSafetensors("{}", 0);
  new DataView(file.buffer).setBigUint64(0, 1000n, true);
  await assertRejected(file, /header length 1000 runs past the end of the file \(10 bytes\)/);
});

Deno.test("rejects an oversized header length", async () => {
  const file = rawSafetensors("{}", 0);
  new DataView(file.buffer).setBigUint64(0, 2n ** 40n, true);
  await assertRejected(file, /header length 1099511627776 is outside 2\.\.104857600 bytes/);
});

Deno.test("rejects a header length below 2", async () => {
  await assertRejected(new Uint8Array(9), /header length 0 is outside/);
});

Deno.test("rejects data shorter than the offsets say", async () => {
  await assertRejected(
    rawSafetensors(f32Entry("x.weight", [3], [0, 12]), 8),
    /tensor "x.weight" data_offsets \[0, 12\] end past the data section \(8 bytes\)/,
  );
});

Deno.test("rejects a header that is not JSON", async () => {
  await assertRejected(rawSafetensors('{"x": [1, 2', 0), /header is not valid UTF-8 JSON/);
});

Deno.test("rejects a header that is not valid UTF-8", async () => {
  const file = rawSafetensors('{"x": 1}', 0);
  file[10] = 0xff;
  await assertRejected(file, /header is not valid UTF-8 JSON/);
});

Deno.test("rejects a header JSON that is not an object", async () => {
  await assertRejected(rawSafetensors([1, 2], 0), /header must be a JSON object, got an array/);
  await assertRejected(rawSafetensors("null", 0), /header must be a JSON object, got null/);
});

Deno.test("rejects __metadata__ that is not an object of strings", async () => {
  await assertRejected(
    rawSafetensors({ __metadata__: { total: 5 } }, 0),
    /"__metadata__" must be an object of string values/,
  );
});

Deno.test("rejects a shape with a negative entry", async () => {
  await assertRejected(
    rawSafetensors(f32Entry("x", [2, -1], [0, 0]), 0),
    /tensor "x" shape \[2,-1\] must be an array of non-negative integers/,
  );
});

Deno.test("rejects a shape with a non-integer entry", async () => {
  await assertRejected(
    rawSafetensors(f32Entry("x", [1.5], [0, 6]), 8),
    /tensor "x" shape \[1\.5\] must be an array of non-negative integers/,
  );
  await assertRejected(
    rawSafetensors(f32Entry("x", "4", [0, 16]), 16),
    /tensor "x" shape "4" must be an array/,
  );
});

Deno.test("rejects malformed and out-of-range data_offsets", async () => {
  await assertRejected(
    rawSafetensors(f32Entry("x", [1], [-4, 0]), 8),
    /tensor "x" data_offsets \[-4,0\] must be \[begin, end\] non-negative integers/,
  );
  await assertRejected(
    rawSafetensors(f32Entry("x", [1], [0]), 8),
    /tensor "x" data_offsets \[0\] must be \[begin, end\]/,
  );
  await assertRejected(
    rawSafetensors(f32Entry("x", [0], [8, 4]), 8),
    /tensor "x" data_offsets \[8, 4\] begin is after end/,
  );
  await assertRejected(
    rawSafetensors(f32Entry("x", [1], [2 ** 53, 2 ** 53 + 4]), 8),
    /tensor "x" data_offsets .* must be \[begin, end\] non-negative integers/,
  );
});

Deno.test("rejects a size mismatch between shape * dtype and data_offsets", async () => {
  await assertRejected(
    rawSafetensors(f32Entry("x.weight", [2, 3], [0, 12]), 24),
    /tensor "x.weight" data_offsets \[0, 12\] hold 12 bytes, but shape \[2, 3\] of F32 needs 24/,
  );
});

Deno.test("rejects a shape whose element count overflows", async () => {
  await assertRejected(
    rawSafetensors(f32Entry("x", [2 ** 40, 2 ** 40], [0, 8]), 8),
    /tensor "x" data_offsets \[0, 8\] hold 8 bytes, but shape .* needs/,
  );
});

Deno.test("rejects overlapping tensors", async () => {
  await assertRejected(
    rawSafetensors({ ...f32Entry("a", [4], [0, 16]), ...f32Entry("b", [4], [8, 24]) }, 24),
    /tensors "a" \[0, 16\] and "b" \[8, 24\] overlap/,
  );
});

Deno.test("accepts zero-size tensors anywhere, including inside another's range", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "model.safetensors");
    const header = { ...f32Entry("a", [4], [0, 16]), ...f32Entry("empty", [0], [8, 8]) };
    await Deno.writeFile(path, rawSafetensors(header, 16));
    assert.equal((await openSafetensors(path)).tensors.get("empty")!.bytes, 0);
  });
});

Deno.test("rejects an unknown dtype", async () => {
  await assertRejected(
    rawSafetensors({ x: { dtype: "Q4_K", shape: [1], data_offsets: [0, 1] } }, 8),
    /tensor "x" has unknown dtype "Q4_K"/,
  );
  await assertRejected(
    rawSafetensors({ x: { dtype: 4, shape: [1], data_offsets: [0, 4] } }, 8),
    /tensor "x" dtype must be a string/,
  );
});

Deno.test("rejects a tensor entry that is not an object", async () => {
  await assertRejected(rawSafetensors({ x: 3 }, 0), /tensor "x" must be an object, got a number/);
});

// ---------------------------------------------------------------------------------------------
// Hostile sharded models

/** Writes a two-shard model (a, b in shard 1; c in shard 2), then `tamper` edits its index. */
async function assertShardedRejected(
  tamper: (weightMap: Record<string, unknown>, dir: string) => Promise<void> | void,
  message: RegExp,
) {
  await withTempDir(async (dir) => {
    const tensors: TensorToWrite[] = ["a", "b", "c"].map((name, i) => ({
      name,
      dtype: "F32",
      shape: [2],
      data: patternBytes(8, i),
    }));
    await writeShardedSafetensors(dir, tensors, 2);
    const indexPath = join(dir, "model.safetensors.index.json");
    const index = JSON.parse(await Deno.readTextFile(indexPath));
    assert.deepEqual(index.weight_map, {
      a: "model-00001-of-00002.safetensors",
      b: "model-00001-of-00002.safetensors",
      c: "model-00002-of-00002.safetensors",
    });
    await tamper(index.weight_map, dir);
    await Deno.writeTextFile(indexPath, JSON.stringify(index));
    await assert.rejects(() => openModelWeights(dir), (e: Error) => {
      assert.ok(e.message.startsWith(`${indexPath}: `), `message names the index: ${e.message}`);
      assert.match(e.message, message);
      return true;
    });
  });
}

Deno.test("rejects an index naming a missing shard", async () => {
  await assertShardedRejected((weightMap) => {
    weightMap.c = "model-00009-of-00009.safetensors";
  }, /shard "model-00009-of-00009.safetensors" does not exist in /);
});

Deno.test("rejects a shard path with ..", async () => {
  await assertShardedRejected((weightMap) => {
    weightMap.c = "../model-00002-of-00002.safetensors";
  }, /weight_map entry for "c" is "\.\.\/model-00002-of-00002\.safetensors", expected a plain/);
});

Deno.test("rejects a shard name that is not a string", async () => {
  await assertShardedRejected((weightMap) => {
    weightMap.c = 2;
  }, /weight_map entry for "c" is 2, expected a plain file name/);
});

Deno.test("rejects a tensor listed in the index but missing from its shard", async () => {
  await assertShardedRejected((weightMap) => {
    weightMap.ghost = "model-00002-of-00002.safetensors";
  }, /tensor "ghost" is missing from its shard "model-00002-of-00002.safetensors"/);
});

Deno.test("rejects an extra tensor in a shard that the index does not list", async () => {
  await assertShardedRejected((weightMap) => {
    delete weightMap.b;
  }, /shard "model-00001-of-00002.safetensors" holds tensor "b", which the index does not list/);
});

Deno.test("rejects a tensor stored in two shards", async () => {
  await assertShardedRejected(async (_weightMap, dir) => {
    // Shard 2 now holds "a" too, as well as "c".
    await writeSafetensors(join(dir, "model-00002-of-00002.safetensors"), [
      { name: "a", dtype: "F32", shape: [2], data: patternBytes(8, 0) },
      { name: "c", dtype: "F32", shape: [2], data: patternBytes(8, 2) },
    ]);
  }, /holds tensor "a", which the index places in "model-00001-of-00002.safetensors"/);
});

Deno.test("openModelWeights names the dir and both file names when it finds neither", async () => {
  await withTempDir(async (dir) => {
    await assertRejectsWithMessage(
      () => openModelWeights(dir),
      new RegExp(
        `^${RegExp.escape(dir)}: found neither model\\.safetensors\\.index\\.json ` +
          `nor model\\.safetensors$`,
      ),
    );
  });
});

// ---------------------------------------------------------------------------------------------
// The shared test model, when this checkout has one

const sharedModelDir = join(import.meta.dirname!, "..", "..", "shared", "models", "gsmwiki-28m");
const hasSharedModel = (() => {
  try {
    return Deno.statSync(join(sharedModelDir, "model.safetensors.index.json")).isFile;
  } catch {
    return false;
  }
})();

Deno.test({
  name: hasSharedModel
    ? "openModelWeights opens the shared gsmwiki-28m model"
    : "openModelWeights opens the shared gsmwiki-28m model (skipped: ../shared/models/gsmwiki-28m absent)",
  ignore: !hasSharedModel,
  async fn() {
    const index = JSON.parse(
      await Deno.readTextFile(join(sharedModelDir, "model.safetensors.index.json")),
    );
    const weights = await openModelWeights(sharedModelDir);
    assert.equal(weights.size, Object.keys(index.weight_map).length);
    const embed = weights.get("model.embed_tokens.weight")!;
    assert.equal(embed.dtype, "BF16");
    assert.deepEqual(embed.shape, [49152, 384]);
    assert.equal(embed.bytes, 49152 * 384 * 2);
    const totalBytes = [...weights.values()].reduce((sum, info) => sum + info.bytes, 0);
    assert.equal(totalBytes, index.metadata.total_size);
    const norm = weights.get("model.norm.weight")!;
    assert.equal(norm.dtype, "BF16");
    assert.ok(toF32(await readTensor(norm), "BF16").every(Number.isFinite));
  },
});
