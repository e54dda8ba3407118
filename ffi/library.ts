// Finds and opens the kernel library: the one place that calls Deno.dlopen.
import { symbols } from "./symbols.ts";

export type BackendKind = "cpu" | "cuda";
export type KernelLibrary = Deno.DynamicLibrary<typeof symbols>;

const buildDir = new URL("../build/", import.meta.url);

/** The library file for a backend: $INNERQ_LIB (for the CPU backend, or for CUDA as
 * $INNERQ_CUDA_LIB) overrides build/libinnerq_<kind>.so. */
export function libraryPath(kind: BackendKind): string {
  const override = Deno.env.get(kind === "cpu" ? "INNERQ_LIB" : "INNERQ_CUDA_LIB");
  return override ?? new URL(`libinnerq_${kind}.so`, buildDir).pathname;
}

export function openLibrary(kind: BackendKind): KernelLibrary {
  const path = libraryPath(kind);
  try {
    Deno.statSync(path);
  } catch (cause) {
    if (cause instanceof Deno.errors.NotFound) {
      throw new Error(`kernel library ${path} not found: run \`deno task build\``, { cause });
    }
    throw cause;
  }
  try {
    return Deno.dlopen(path, symbols);
  } catch (cause) {
    if (cause instanceof Deno.errors.PermissionDenied) throw cause;
    const why = cause instanceof Error ? cause.message : String(cause);
    throw new Error(`could not load kernel library ${path}: ${why}`, { cause });
  }
}
