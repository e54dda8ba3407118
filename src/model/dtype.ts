// Tensor element types (safetensors names) and conversions between them.

/** Element sizes of every dtype the safetensors format defines. */
const SAFETENSORS_DTYPE_BYTES = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
} as const;

/** Any dtype a safetensors file may declare; files are validated against all of them. */
export type SafetensorsDType = keyof typeof SAFETENSORS_DTYPE_BYTES;

/** The dtypes the model loader can convert. */
export type DType = "F32" | "F16" | "BF16";

export function isSafetensorsDType(name: string): name is SafetensorsDType {
  return Object.hasOwn(SAFETENSORS_DTYPE_BYTES, name);
}

export function isDType(name: string): name is DType {
  return name === "F32" || name === "F16" || name === "BF16";
}

/** Bytes per element. */
export function dtypeBytes(dtype: SafetensorsDType): number {
  return SAFETENSORS_DTYPE_BYTES[dtype];
}

/** Rounds to the nearest bf16, ties to even; NaN stays NaN (made quiet, sign kept). */
export function f32ToBf16(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i];
    const isNaN = (b & 0x7fffffff) > 0x7f800000;
    // Plain truncation could turn a NaN whose payload sits in the low half into infinity.
    out[i] = isNaN ? (b >>> 16) | 0x0040 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** Exact: bf16 is the top half of an f32. */
export function bf16ToF32(values: Uint16Array): Float32Array {
  const bits = new Uint32Array(values.length);
  for (let i = 0; i < values.length; i++) bits[i] = values[i] << 16;
  return new Float32Array(bits.buffer);
}

/** Rounds to the nearest f16, ties to even, with overflow to infinity and subnormals.
 * Float16Array (native in Deno 2.9) rounds each f64 correctly, and f32 -> f64 is exact,
 * so there is no double rounding. */
export function f32ToF16(values: Float32Array): Uint16Array {
  return new Uint16Array(new Float16Array(values).buffer);
}

/** Exact: every f16 is representable as an f32. */
export function f16ToF32(values: Uint16Array): Float32Array {
  return new Float32Array(new Float16Array(values.buffer, values.byteOffset, values.length));
}

// Typed arrays use the host byte order; safetensors data is little-endian.
const hostIsLittleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Decodes little-endian tensor bytes into a new Float32Array. `bytes` may be unaligned. */
export function toF32(bytes: Uint8Array, dtype: DType): Float32Array {
  if (!hostIsLittleEndian) throw new Error("toF32 needs a little-endian host");
  const size = dtypeBytes(dtype);
  if (bytes.length % size !== 0) {
    throw new Error(`toF32: ${bytes.length} bytes is not a whole number of ${dtype} values`);
  }
  // slice() copies into a fresh, aligned buffer, so the views below are legal.
  const aligned = bytes.slice().buffer;
  switch (dtype) {
    case "F32":
      return new Float32Array(aligned);
    case "F16":
      return f16ToF32(new Uint16Array(aligned));
    case "BF16":
      return bf16ToF32(new Uint16Array(aligned));
  }
}
