// Where a forward pass spends its time: a view of a backend whose kernel calls each wait for the
// device before and after and add their time to a total per op. The waits remove the overlap of
// launches with device work, so a profiled run is slower than a plain one; the shares are what
// it is for.
import type { Backend } from "../../ffi/backend.ts";

/** The backend methods that launch device work. */
const OPS = new Set<string | symbol>([
  "embed",
  "rmsnorm",
  "matmul",
  "rope",
  "swiglu",
  "add",
  "kvStore",
  "attentionPrefill",
  "attentionDecode",
  "kvqStore",
  "kvqAttention",
  "sample",
]);

export interface OpTime {
  /** the method; a matmul also names its in and out features */
  op: string;
  calls: number;
  seconds: number;
}

export class OpProfile {
  /** Use in place of the backend it wraps; other methods and fields pass through. */
  readonly backend: Backend;
  #times = new Map<string, OpTime>();

  constructor(target: Backend) {
    this.backend = new Proxy(target, {
      get: (t, prop) => {
        const value = Reflect.get(t, prop, t);
        if (typeof value !== "function") return value;
        if (!OPS.has(prop)) return value.bind(t); // the real backend: its private fields
        return (...args: unknown[]) => {
          t.sync();
          const start = performance.now();
          const result = value.apply(t, args);
          t.sync();
          this.#add(label(String(prop), args), (performance.now() - start) / 1000);
          return result;
        };
      },
    });
  }

  /** Forgets what was timed so far. */
  reset(): void {
    this.#times.clear();
  }

  /** The totals so far (copies), most time first. */
  times(): OpTime[] {
    return [...this.#times.values()].map((t) => ({ ...t })).sort((a, b) => b.seconds - a.seconds);
  }

  #add(op: string, seconds: number): void {
    const t = this.#times.get(op) ?? { op, calls: 0, seconds: 0 };
    t.calls++;
    t.seconds += seconds;
    this.#times.set(op, t);
  }
}

/** matmul(out, x, xDtype, w, wDtype, bias, n, k, m): k -> m tells the projections apart. */
function label(op: string, args: unknown[]): string {
  return op === "matmul" ? `matmul ${args[7]}->${args[8]}` : op;
}
