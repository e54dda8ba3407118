// --kv specs: the defaults of each family, every option, canonical text that parses back to the
// same spec, bytes per token by hand at the Llama-3-8B shape, and clear errors for bad text.
import { deepStrictEqual as assertEquals, throws as assertThrows } from "node:assert";
import {
  checkKvSpec,
  formatKvSpec,
  kvBytesPerToken,
  parseKvSpec,
  shortKvSpec,
} from "../src/kv/spec.ts";

Deno.test("defaults: innerq groups keys over channels with normalization, kivi over tokens", () => {
  assertEquals(parseKvSpec("innerq:k4v2"), {
    kind: "innerq",
    kBits: 4,
    vBits: 2,
    kGroup: 32,
    vGroup: 32,
    kAxis: "channels",
    vAxis: "tokens",
    sink: 4,
    recent: 32,
    norm: "max",
    hybrid: true,
    meta: "f16",
  });
  const kivi = parseKvSpec("kivi:k2v2");
  assertEquals([
    kivi.kind,
    "kAxis" in kivi && kivi.kAxis,
    "norm" in kivi && kivi.norm,
    "meta" in kivi && kivi.meta,
  ], ["kivi", "tokens", "off", "f16"]);
  assertEquals(parseKvSpec("fp16"), { kind: "fp16" });
});

Deno.test("every option is read, and the canonical text parses back to the same spec", () => {
  const text =
    "innerq:k3v8,gk=64,gv=16,sink=0,recent=100,norm=rms,hybrid=off,kaxis=tokens,vaxis=tokens,g=16," +
    "meta=e5m2";
  const spec = parseKvSpec(text);
  assertEquals(spec, {
    kind: "innerq",
    kBits: 3,
    vBits: 8,
    kGroup: 16,
    vGroup: 16,
    kAxis: "tokens",
    vAxis: "tokens",
    sink: 0,
    recent: 100,
    norm: "rms",
    hybrid: false,
    meta: "e5m2",
  });
  const e4m3 = parseKvSpec("kivi:k4v4,meta=e4m3");
  assertEquals("meta" in e4m3 && e4m3.meta, "e4m3");
  for (const s of [spec, e4m3, parseKvSpec("kivi:k4v4"), parseKvSpec("fp32")]) {
    assertEquals(parseKvSpec(formatKvSpec(s)), s);
  }
});

Deno.test("bytes per token at the Llama-3-8B shape, codes and pairs counted by hand", () => {
  const shape = { layers: 32, heads: 32, kvHeads: 8, headDim: 128 };
  const perHead = (k: number, v: number, gk: number, gv: number, pair = 4) =>
    32 * 8 * (128 * (k + v) / 8 + pair * 128 / gk + pair * 128 / gv);
  assertEquals(kvBytesPerToken(parseKvSpec("fp16"), shape), 131072);
  assertEquals(kvBytesPerToken(parseKvSpec("innerq:k4v2"), shape), perHead(4, 2, 32, 32));
  assertEquals(kvBytesPerToken(parseKvSpec("innerq:k4v2"), shape), 32768);
  assertEquals(
    kvBytesPerToken(parseKvSpec("kivi:k2v2,gk=64,gv=128"), shape),
    perHead(2, 2, 64, 128),
  );
  // fp8 pairs take 2 bytes: half the group size costs what fp16 pairs cost at the full size
  for (const meta of ["e4m3", "e5m2"]) {
    assertEquals(
      kvBytesPerToken(parseKvSpec(`innerq:k4v2,meta=${meta}`), shape),
      perHead(4, 2, 32, 32, 2),
    );
    assertEquals(kvBytesPerToken(parseKvSpec(`innerq:k4v2,g=16,meta=${meta}`), shape), 32768);
  }
  assertEquals(kvBytesPerToken(parseKvSpec("innerq:k4v2,meta=e4m3"), shape), 28672);
});

Deno.test("bad specs are one clear error naming the spec and what is allowed", () => {
  const bad: [string, RegExp][] = [
    ["int4", /unknown cache "int4"/],
    ["innerq", /bits "" are not kKvV/],
    ["innerq:k5v2", /bits "k5v2" are not kKvV with K and V in 2, 3, 4, 8/],
    ["innerq:k4", /bits "k4"/],
    ["kivi:kxvy", /bits "kxvy"/],
    ["innerq:k4v2,foo=1", /unknown option "foo"/],
    ["innerq:k4v2,sink", /option "sink" is not key=value/],
    ["innerq:k4v2,sink=1,sink=2", /option sink given twice/],
    ["innerq:k4v2,sink=-1", /sink=-1: expected an integer in 0\.\.1048576/],
    ["innerq:k4v2,recent=1.5", /recent=1\.5: expected an integer/],
    ["innerq:k4v2,gk=24", /gk=24: a group is a power of two from 8 to 128/],
    ["innerq:k4v2,gv=256", /gv=256: expected an integer in 8\.\.128/],
    ["innerq:k4v2,norm=l2", /norm=l2: expected one of max, rms, off/],
    ["innerq:k4v2,hybrid=yes", /hybrid=yes: expected one of on, off/],
    ["innerq:k4v2,meta=fp8", /meta=fp8: expected one of f16, e4m3, e5m2/],
    ["innerq:k4v2,meta=E4M3", /meta=E4M3: expected one of f16, e4m3, e5m2/],
    ["innerq:k4v2,meta=e4m3,meta=e5m2", /option meta given twice/],
    [
      "innerq:k4v2,kaxis=tokens,gk=16,gv=32",
      /both grouped over tokens need one group size, got 16, 32/,
    ],
  ];
  for (const [text, why] of bad) {
    assertThrows(() => parseKvSpec(text), (e: Error) => {
      if (!why.test(e.message)) throw new Error(`${text}: ${e.message}`);
      return e.message.startsWith(`--kv ${JSON.stringify(text)}`) &&
        /allowed: fp16, fp32/.test(e.message);
    });
  }
});

Deno.test("a spec that does not fit the model's head_dim is refused", () => {
  assertThrows(
    () => checkKvSpec(parseKvSpec("innerq:k4v4"), 16),
    /head_dim a multiple of 32, the model has 16/,
  );
  assertThrows(
    () => checkKvSpec(parseKvSpec("innerq:k4v4,gk=128"), 96),
    /gk=128 must divide the model's head_dim 96/,
  );
  checkKvSpec(parseKvSpec("kivi:k2v2,gk=128"), 96); // grouped over tokens: any head_dim
  checkKvSpec(parseKvSpec("fp16"), 16);
});

Deno.test("shortKvSpec keeps bits, family and the options that differ from the defaults", () => {
  assertEquals(shortKvSpec(parseKvSpec("innerq:k2v2")), "innerq:k2v2");
  assertEquals(shortKvSpec(parseKvSpec("innerq:k4v2,kaxis=tokens")), "innerq:k4v2,kaxis=tokens");
  assertEquals(
    shortKvSpec(parseKvSpec("innerq:k2v2,kaxis=channels")),
    "innerq:k2v2,kaxis=channels",
  );
  // 2-bit keys are grouped over tokens by default, 3 bits and more over channels
  const axis = (text: string) => {
    const spec = parseKvSpec(text);
    return "kAxis" in spec && spec.kAxis;
  };
  assertEquals(axis("innerq:k2v4"), "tokens");
  assertEquals(axis("innerq:k3v2"), "channels");
  assertEquals(
    shortKvSpec(parseKvSpec("kivi:k4v4,g=64,norm=max")),
    "kivi:k4v4,gk=64,gv=64,norm=max",
  );
  assertEquals(shortKvSpec(parseKvSpec("innerq:k4v2,meta=f16")), "innerq:k4v2");
  assertEquals(shortKvSpec(parseKvSpec("innerq:k4v2,meta=e4m3")), "innerq:k4v2,meta=e4m3");
  assertEquals(
    shortKvSpec(parseKvSpec("kivi:k2v2,meta=e5m2,g=16")),
    "kivi:k2v2,gk=16,gv=16,meta=e5m2",
  );
  assertEquals(shortKvSpec(parseKvSpec("fp16")), "fp16");
});
