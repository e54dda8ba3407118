// rmsnorm with a residual on one backend, what ops_test (CPU against the host) and cuda_test (CUDA
// against the CPU) both check: x as it is left (x + residual) and the norm written out.
import { type Backend, DType } from "../ffi/backend.ts";

export function rmsnormResidual(
  be: Backend,
  x: Float32Array,
  residual: Float32Array,
  weight: Float32Array,
  n: number,
  dim: number,
): { kept: Float32Array; normed: Float32Array } {
  using xb = be.alloc(n * dim * 4), rb = be.alloc(n * dim * 4), wb = be.alloc(dim * 4);
  using out = be.alloc(n * dim * 4);
  be.upload(xb, x), be.upload(rb, residual), be.upload(wb, weight);
  be.rmsnorm(out, DType.F32, xb, wb, n, dim, 1e-5, rb);
  const kept = new Float32Array(n * dim), normed = new Float32Array(n * dim);
  be.download(xb, kept), be.download(out, normed);
  return { kept, normed };
}
