// A backend that reports itself as another kind, so the forward pass plans and runs what it would
// on that kind (gemmInputDtype picks prefill's GEMM input dtype by the backend's kind): the CPU as
// CUDA runs the narrow-input path on the reference kernels, the GPU as the CPU the fp32 one.
import type { Backend, BackendKind } from "../ffi/backend.ts";

export function backendAs(be: Backend, kind: BackendKind): Backend {
  return new Proxy(be, {
    get: (t, prop) => {
      if (prop === "kind") return kind;
      const value = Reflect.get(t, prop, t);
      return typeof value === "function" ? value.bind(t) : value;
    },
  });
}
