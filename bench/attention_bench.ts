// One decode step of attention at the Llama-3-8B layer shape, per context length (a group each,
// the fp16 cache the baseline), for fp16, innerq k4v4 / k4v2 / k2v2 and kivi k4v4 / k2v2.
// `INNERQ_DEVICE=cuda deno bench -A bench/attention_bench.ts`; on the CPU only 1k and 4k run.
// Each case prints the bytes it reads, so GB/s = bytes / (time per iteration).
import { Backend, type BackendKind } from "../ffi/backend.ts";
import { AttentionCase } from "../src/commands/attention_case.ts";
import { parseKvSpec } from "../src/kv/spec.ts";

const kind = (Deno.env.get("INNERQ_DEVICE") ?? "cpu") as BackendKind;
const backend = Backend.open(kind);
const lengths = kind === "cuda" ? [1024, 4096, 32768, 131072, 1048576] : [1024, 4096];
const specs = ["fp16", "innerq:k4v4", "innerq:k4v2", "innerq:k2v2", "kivi:k4v4", "kivi:k2v2"];
const cases: AttentionCase[] = [];
globalThis.addEventListener("unload", () => {
  for (const c of cases) c.close();
  backend.close();
});

for (const tokens of lengths) {
  for (const spec of specs) {
    const name = `${spec} ${tokens} tokens`;
    let attention: AttentionCase | null = null;
    Deno.bench({
      name,
      group: `${tokens} tokens`,
      baseline: spec === "fp16",
      n: kind === "cuda" ? 200 : 5,
      fn: () => {
        // made on first use, so one length's caches are in memory at a time
        if (!attention) {
          for (const c of cases.splice(0)) c.close();
          attention = new AttentionCase(backend, parseKvSpec(spec), tokens);
          cases.push(attention);
          console.log(`${name}: ${(attention.bytes / 1e6).toFixed(1)} MB of cache per step`);
        }
        attention.step();
        backend.sync();
      },
    });
  }
}
