// Decode speed of whole models: one forward step of a single token at a fixed position, the unit of
// generation. `deno task bench`; INNERQ_BENCH_MODEL=DIR adds a model of your own, INNERQ_DEVICE=cuda
// benches the GPU backend.
import { Backend, type BackendKind } from "../ffi/backend.ts";
import { Transformer } from "../src/engine/forward.ts";
import { loadConfig } from "../src/model/config.ts";
import { writeRandomModel } from "../src/model/random_model.ts";

const kind = (Deno.env.get("INNERQ_DEVICE") ?? "cpu") as BackendKind;
const shared = new URL("../../shared/models/gsmwiki-28m", import.meta.url).pathname;
const tiny = await Deno.makeTempDir({ prefix: "innerq-bench-" });
await writeRandomModel(tiny, "tiny", { seed: 1 });
globalThis.addEventListener("unload", () => Deno.removeSync(tiny, { recursive: true }));

const models = [tiny, Deno.env.get("INNERQ_BENCH_MODEL") ?? shared].filter((dir) => {
  try {
    return Deno.statSync(`${dir}/config.json`).isFile;
  } catch {
    return false;
  }
});

const backend = Backend.open(kind);
for (const dir of models) {
  const config = await loadConfig(dir);
  const model = await Transformer.load(backend, dir, config, { ctx: 1024, kv: { kind: "fp16" } });
  // fill the cache up to the position the step decodes at
  const depth = 512;
  const prompt = new Int32Array(depth).map((_, i) => (i * 7919) % config.vocabSize);
  for (let pos = 0; pos < depth; pos += model.chunk) {
    const ids = prompt.subarray(pos, pos + model.chunk);
    model.forward(model.stageTokens(ids), pos, ids.length);
  }
  const token = model.stageTokens(Int32Array.of(1));
  const logits = new Float32Array(1);
  Deno.bench(`decode one token at depth ${depth}: ${dir.split("/").pop()} (${kind})`, () => {
    backend.download(model.forward(token, depth, 1), logits);
  });
}
