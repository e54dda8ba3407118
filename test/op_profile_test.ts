// OpProfile: a profiled backend gives the same logits as the plain one and counts every kernel
// call of a forward pass under its op (matmuls by their in and out features).
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { Backend } from "../ffi/backend.ts";
import { Transformer } from "../src/engine/forward.ts";
import { OpProfile } from "../src/engine/op_profile.ts";
import { loadConfig } from "../src/model/config.ts";
import { writeRandomModel } from "../src/model/random_model.ts";

Deno.test("op profile: same logits, every call of a forward pass counted under its op", async () => {
  const dir = await Deno.makeTempDir({ prefix: "innerq-profile-" });
  try {
    await writeRandomModel(dir, "tiny");
    const config = await loadConfig(dir);
    using backend = Backend.open("cpu", { threads: 2 });
    const profile = new OpProfile(backend);
    const ids = Int32Array.from([1, 5, 9, 14, 2]);
    const logits = async (be: Backend) => {
      using model = await Transformer.load(be, dir, config, { ctx: 32, kv: "fp16" });
      const out = new Float32Array(config.vocabSize);
      be.download(model.forward(model.stageTokens(ids), 0, ids.length), out);
      return out;
    };
    const plain = await logits(backend);
    profile.reset(); // loading uploads only; start from the forward pass
    assertEquals(await logits(profile.backend), plain);

    const calls = new Map(profile.times().map((t) => [t.op, t.calls]));
    const layers = config.numLayers, dim = config.hiddenSize;
    assertEquals(calls.get("embed"), 1);
    assertEquals(calls.get("rmsnorm"), 2 * layers + 1);
    assertEquals(calls.get("attentionPrefill"), layers);
    assertEquals(calls.get(`matmul ${dim}->${config.intermediateSize}`), 2 * layers); // gate, up
    assertEquals(calls.get(`matmul ${dim}->${config.vocabSize}`), 1);
    assert(profile.times().every((t) => t.seconds >= 0));
    profile.reset();
    assertEquals(profile.times(), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
