// In-process A/B of one decode step of attention (the Llama-3-8B layer at 4096 tokens, one thread)
// between two builds of the CPU library, alternating step by step so that the host's drift hits
// both alike (this machine's timings drift by up to 50% between runs); prints each side's
// minimum and median of 60 steps:
//   deno run -A scripts/cpu_attn_ab.ts /tmp/before.so build/libinnerq_cpu.so fp16 innerq:k4v2
import { Backend } from "../ffi/backend.ts";
import { AttentionCase } from "../src/commands/attention_case.ts";
import { parseKvSpec } from "../src/kv/spec.ts";
const [libA, libB, ...specs] = Deno.args;
const open = (lib: string) => {
  Deno.env.set("INNERQ_LIB", lib);
  return Backend.open("cpu", { threads: 1 });
};
const backends = [open(libA), open(libB)];
for (const text of specs) {
  const cases = backends.map((b) => new AttentionCase(b, parseKvSpec(text), 4096));
  const times: number[][] = [[], []];
  for (let i = 0; i < 60; i++) {
    for (const side of [0, 1]) {
      const t = performance.now();
      cases[side].step();
      backends[side].sync();
      times[side].push((performance.now() - t) * 1000);
    }
  }
  const stat = (x: number[]) => {
    const s = [...x].sort((a, b) => a - b);
    return `min ${s[0].toFixed(0)} med ${s[s.length >> 1].toFixed(0)}`;
  };
  console.log(`${text}: A ${stat(times[0])} | B ${stat(times[1])} us`);
  cases.forEach((c) => c.close());
}
backends.forEach((b) => b.close());
