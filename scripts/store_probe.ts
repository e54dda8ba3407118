// Stores tokens one at a time into a one-layer cache of the Llama-3-8B layer shape, as decode
// steps do, so that a profiler can time the store kernels (the quantized caches' quantize kernel
// runs at every 32nd token):
//   ncu --kernel-name regex:"quantize|rows_kernel|kv_store" --metrics gpu__time_duration.sum \
//     deno run -A scripts/store_probe.ts --kv innerq:k4v4 --tokens 200
import { parseArgs } from "node:util";
import { openBackend } from "../src/commands/common.ts";
import { makeKvCache, parseKvSpec } from "../src/kv/spec.ts";
import { fillRows, LAYER } from "../src/commands/attention_case.ts";

const { values } = parseArgs({
  options: {
    kv: { type: "string", default: "innerq:k4v4" },
    tokens: { type: "string", default: "200" },
    device: { type: "string", default: "cuda" },
  },
});
const tokens = Number(values.tokens);
if (!Number.isInteger(tokens) || tokens < 1 || tokens > 4096) {
  throw new Error(`--tokens ${values.tokens}: expected a whole number from 1 to 4096`);
}
if (values.device !== "cuda" && values.device !== "cpu") {
  throw new Error(`--device ${values.device}: expected cuda or cpu`);
}
using backend = openBackend(values.device, undefined, true);
const { kvHeads, headDim } = LAYER;
const shape = { ...LAYER, layers: 1, capacity: 4096, chunk: 1 };
const cache = makeKvCache(backend, shape, parseKvSpec(values.kv!));
const rows = fillRows(tokens, kvHeads, headDim);
const x = backend.alloc(rows.byteLength);
backend.upload(x, rows);
const row = kvHeads * headDim * 4;
for (let p = 0; p < tokens; p++) cache.store(0, x.slice(p * row, row), x.slice(p * row, row), p, 1);
backend.sync();
console.log(`${cache.spec}: ${tokens} tokens stored one at a time (${values.device})`);
cache.close();
x.close();
