// Whether one decode step of attention at short context is bound by the host's submission or by
// the GPU: for each spec and length, the time to submit 2000 steps against the time until they
// finish (equal times: the GPU waits on the host). A measuring instrument for the GPU machine:
//   deno run -A scripts/host_probe.ts [SPEC ...]
import { openBackend } from "../src/commands/common.ts";
import { AttentionCase } from "../src/commands/attention_case.ts";
import { parseKvSpec } from "../src/kv/spec.ts";

const specs = Deno.args.length ? Deno.args : ["fp16", "innerq:k2v2", "innerq:k4v4"];
const steps = 2000;
using backend = openBackend("cuda", undefined, true);
for (const tokens of [1024, 4096]) {
  for (const spec of specs) {
    using attention = new AttentionCase(backend, parseKvSpec(spec), tokens);
    for (let r = 0; r < 3; r++) {
      backend.sync();
      const start = performance.now();
      for (let i = 0; i < steps; i++) attention.step();
      const submitted = performance.now();
      backend.sync();
      const done = performance.now();
      const us = (ms: number) => (ms * 1000 / steps).toFixed(2);
      console.log(
        `${tokens} ${spec}: submit ${us(submitted - start)} us/step, finish ${
          us(done - start)
        } us/step`,
      );
    }
  }
}
