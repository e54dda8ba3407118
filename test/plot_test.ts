// innerq ppl --plot: the KL chart (one labelled mark per spec, log-scale KL, the fp16 reference named
// and ruled, valid SVG) and the command line that writes it.
import { deepStrictEqual as assertEquals, match as assertMatch, ok as assert } from "node:assert";
import * as vega from "vega";
import { compile } from "vega-lite";
import { klPlotSpec, klPlotSvg, type KlPoint, specFamily } from "../src/report/kl_plot.ts";
import { writeRandomModel } from "../src/model/random_model.ts";

const KIB = 1024;
const POINTS: KlPoint[] = [
  { spec: "innerq:k8v8", bytesPerToken: 72 * KIB, meanKl: 2.1e-4, top1: 0.995, ppl: 10.1 },
  { spec: "innerq:k4v2", bytesPerToken: 32 * KIB, meanKl: 0.021, top1: 0.95, ppl: 10.5 },
  { spec: "innerq:k2v2", bytesPerToken: 24 * KIB, meanKl: 0.09, top1: 0.88, ppl: 11.5 },
  { spec: "kivi:k2v2", bytesPerToken: 24 * KIB, meanKl: 0.31, top1: 0.8, ppl: 13.1 },
  { spec: "fp32", bytesPerToken: 256 * KIB, meanKl: 3e-6, top1: 1, ppl: 10 },
];
const REFERENCE = { spec: "fp16", bytesPerToken: 128 * KIB, ppl: 10 };

interface Node {
  name: string;
  attrs: string;
  cls: string;
  children: Node[];
  text: string;
}

/** The SVG document as a tree, checked to nest properly (Deno has no XML parser of its own). */
function parseSvg(svg: string): Node {
  assert(svg.startsWith("<svg "), svg.slice(0, 80));
  assert(svg.trimEnd().endsWith("</svg>"), svg.slice(-80));
  const root: Node = { name: "", attrs: "", cls: "", children: [], text: "" };
  const open = [root];
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z][\w:-]*)([^>]*?)(\/?)>|([^<]+)/g)) {
    const [, closing, name, attrs, selfClosing, text] = m;
    const top = open[open.length - 1];
    if (text !== undefined) top.text += text;
    else if (closing) assertEquals(open.pop()!.name, name);
    else {
      const cls = attrs.match(/class="([^"]*)"/)?.[1] ?? "";
      const node = { name, attrs, cls, children: [], text: "" };
      top.children.push(node);
      if (!selfClosing) open.push(node);
    }
  }
  assertEquals(open.map((n) => n.name), [""]);
  assertEquals(root.children.map((n) => n.name), ["svg"]);
  return root.children[0];
}

function* walk(node: Node): Generator<Node> {
  yield node;
  for (const child of node.children) yield* walk(child);
}

/** The elements inside every element whose class list holds `cls`. */
function inside(svg: Node, cls: string, name: string): Node[] {
  return [...walk(svg)].filter((n) => n.cls.split(" ").includes(cls))
    .flatMap((n) => [...walk(n)].slice(1).filter((c) => c.name === name));
}

/** The lines of text (a <text>, or each of its <tspan>s) inside the elements of class `cls`. */
const texts = (svg: Node, cls: string) =>
  inside(svg, cls, "text").flatMap((n) =>
    n.children.length === 0 ? [n.text] : n.children.map((t) => t.text)
  );

/** How many symbols a symbol mark draws. */
const symbols = (svg: Node, cls: string) => inside(svg, cls, "path").length;

Deno.test("the chart: one mark and one label per spec, valid SVG", async () => {
  const svg = await klPlotSvg(POINTS, { title: "Llama-3-8B: 4096 tokens", reference: REFERENCE });
  const tree = parseSvg(svg);
  assertEquals(symbols(tree, "points_marks"), POINTS.length);
  const labels = [...texts(tree, "labels_right_marks"), ...texts(tree, "labels_left_marks")];
  assertEquals(labels.length, POINTS.length);
  for (const p of POINTS) {
    const top1 = `${(100 * p.top1).toFixed(1)}%`;
    assert(
      labels.some((l) => l.startsWith(`${p.spec} `) && l.endsWith(top1)),
      `${p.spec}: ${labels}`,
    );
  }
  const title = texts(tree, "role-title-text"), subtitle = texts(tree, "role-title-subtitle");
  assertEquals(title, ["Llama-3-8B: 4096 tokens"]);
  // fp16 is no mark but a rule, its label, and the subtitle
  assertEquals(inside(tree, "reference_rule_marks", "line").length, 1);
  assertEquals(texts(tree, "reference_label_marks"), ["fp16 (reference)"]);
  assertMatch(
    subtitle[0],
    /^fp16 is the reference \(KL 0, ppl 10\): the dashed line at 128 KiB\/token$/,
  );
  assertMatch(subtitle[1], /top-1 agreement with fp16/);
  // the legend names the families present
  assertEquals(texts(tree, "role-legend-label"), ["innerq", "kivi", "dense"]);
  assertEquals(POINTS.map((p) => specFamily(p.spec)), [
    "innerq",
    "innerq",
    "innerq",
    "kivi",
    "dense",
  ]);
});

/** The y axis's tick labels, bottom to top, with their heights in pixels. */
function yTicks(tree: Node): { label: string; y: number }[] {
  const axes = [...walk(tree)].filter((n) => n.cls.split(" ").includes("role-axis-label"));
  assertEquals(axes.length, 2); // x, then y
  return axes[1].children.map((t) => ({
    label: t.text,
    y: Number(t.attrs.match(/,(-?[\d.]+)\)/)![1]),
  }));
}

Deno.test("the KL axis is logarithmic: a tick a decade, evenly spaced", async () => {
  const svg = await klPlotSvg(POINTS, { title: "t", reference: REFERENCE });
  const ticks = yTicks(parseSvg(svg));
  assertEquals(ticks.map((t) => t.label), ["1e-5", "1e-4", "0.001", "0.01", "0.1"]);
  const gaps = ticks.slice(1).map((t, i) => ticks[i].y - t.y);
  for (const g of gaps) assert(g > 0 && Math.abs(g - gaps[0]) < 0.01, `tick gaps ${gaps}`);
  assert(
    texts(parseSvg(svg), "role-axis-title").includes("mean KL(fp16 ‖ spec), nats (log scale)"),
  );

  // data within a decade: ticks at 1, 2 and 5 times the powers of ten
  const near = yTicks(parseSvg(await klPlotSvg(POINTS.slice(1, 3), { title: "t" })));
  assertEquals(near.map((t) => t.label), ["0.02", "0.05", "0.1"]);
});

Deno.test("specs off a log axis (KL 0, nothing scored) are named, not drawn", async () => {
  const points: KlPoint[] = [
    POINTS[1],
    { spec: "innerq:k4v2,norm=off", bytesPerToken: 32 * KIB, meanKl: 0, top1: 1, ppl: 10 },
    { spec: "kivi:k4v2", bytesPerToken: 32 * KIB, meanKl: NaN, top1: NaN, ppl: NaN },
  ];
  const tree = parseSvg(await klPlotSvg(points, { title: "t", notes: ["a note"] }));
  assertEquals(symbols(tree, "points_marks"), 1);
  assertEquals(texts(tree, "role-title-subtitle").slice(1), [
    "not drawn: innerq:k4v2,norm=off (KL 0), kivi:k4v2 (no tokens scored)",
    "a note",
  ]);
  const empty = parseSvg(await klPlotSvg([], { title: "t", reference: REFERENCE }));
  assertEquals(symbols(empty, "points_marks"), 0);
  assert(texts(empty, "role-title-subtitle").some((t) => /nothing to draw/.test(t)));
});

/** Made-up figures shaped like scripts/kv_sweep.sh's specs: a dozen marks within a few pixels. */
const SWEEP: KlPoint[] = ([
  ["innerq:k8v8", 9, 4e-4],
  ["innerq:k4v4", 5, 6e-3],
  ["innerq:k4v2", 4, 0.03],
  ["innerq:k2v2", 3, 0.12],
  ["innerq:k2v2,g=64", 2.5, 0.17],
  ["innerq:k2v2,gk=64,gv=32", 2.75, 0.14],
  ["innerq:k2v2,norm=rms", 3, 0.13],
  ["innerq:k2v2,norm=off", 3, 0.4],
  ["innerq:k2v2,hybrid=off", 3, 0.14],
  ["innerq:k2v2,recent=64", 3, 0.1],
  ["innerq:k2v2,sink=0", 3, 0.13],
  ["innerq:k2v2,kaxis=tokens", 3, 0.3],
  ["kivi:k4v2", 4, 0.05],
  ["kivi:k2v2", 3, 0.5],
  ["kivi:k2v2,norm=max", 3, 0.2],
] as const).map(([spec, bits, meanKl]) => ({
  spec,
  bytesPerToken: bits / 16 * 12 * KIB,
  meanKl,
  top1: 1 - meanKl / 2,
  ppl: 20,
}));

Deno.test("crowded labels are spread apart, each tied to its mark", async () => {
  const tree = parseSvg(await klPlotSvg(SWEEP, { title: "sweep", reference: REFERENCE }));
  assertEquals(symbols(tree, "points_marks"), SWEEP.length);
  const labels = inside(tree, "labels_right_marks", "text").map((n) => {
    const [x, y] = n.attrs.match(/translate\(([-\d.]+),([-\d.]+)\)/)!.slice(1).map(Number);
    return { text: n.text, x, y, x1: x + 0.6 * 11 * n.text.length };
  });
  assertEquals(labels.length, SWEEP.length); // all fit right of their marks
  for (const [i, a] of labels.entries()) {
    for (const b of labels.slice(i + 1)) {
      const across = Math.min(a.x1, b.x1) > Math.max(a.x, b.x);
      assert(!across || Math.abs(a.y - b.y) >= 13.9, `"${a.text}" and "${b.text}" overlap`);
    }
  }
  // the moved ones get a leader line
  assert(inside(tree, "leaders_marks", "line").length >= 8);
});

Deno.test("Vega and Vega-Lite have no warning about the chart", async () => {
  const said: string[] = [];
  const logger = vega.logger(vega.Warn, undefined, (_method, level, input) => {
    said.push(`${level} ${input.join(" ")}`);
  });
  for (
    const [points, reference] of [[POINTS, REFERENCE], [SWEEP, REFERENCE], [[], undefined]] as const
  ) {
    const { spec } = compile(klPlotSpec([...points], { title: "t", reference }), { logger });
    const view = new vega.View(vega.parse(spec), { renderer: "none", logger });
    parseSvg(await view.toSVG());
    view.finalize();
  }
  assertEquals(said, []);
});

Deno.test("innerq ppl --plot writes the chart; a path it cannot write fails first, exit 1", async () => {
  const dir = await Deno.makeTempDir({ prefix: "innerq-plot-" });
  try {
    await writeRandomModel(dir, "tiny", { seed: 5, shape: { headDim: 64 } });
    const text = `${dir}/text.txt`;
    await Deno.writeTextFile(text, "the keys and values of the cache are quantized. ".repeat(6));
    const base = ["ppl", "--model", dir, "--file", text, "--device", "cpu", "--ctx", "64"];
    const cli = new URL("../cli.ts", import.meta.url).pathname;
    const innerq = async (args: string[]) => {
      const r = await new Deno.Command(Deno.execPath(), {
        args: ["run", "--allow-all", "--quiet", cli, ...args],
        stdin: "null",
      }).output();
      const decode = (b: Uint8Array) => new TextDecoder().decode(b);
      return { code: r.code, stdout: decode(r.stdout), stderr: decode(r.stderr) };
    };

    const plot = `${dir}/kl.svg`;
    const run = await innerq([
      ...base,
      "--limit",
      "128",
      "--kv",
      "innerq:k4v2",
      "--kv",
      "kivi:k2v2",
      "--plot",
      plot,
    ]);
    assertEquals(run.code, 0, run.stderr);
    assertMatch(run.stdout, /^spec +bits/); // the table as before
    assertMatch(run.stderr, new RegExp(`plot written to ${plot}`));
    const tree = parseSvg(await Deno.readTextFile(plot));
    assertEquals(symbols(tree, "points_marks"), 2);
    const labels = [...texts(tree, "labels_right_marks"), ...texts(tree, "labels_left_marks")];
    assertEquals(labels.map((l) => l.split(" ")[0]).sort(), ["innerq:k4v2", "kivi:k2v2"]);
    const scored = run.stderr.match(/(\d+) tokens scored/)![1];
    const name = dir.split("/").pop();
    assertEquals(texts(tree, "role-title-text"), [
      `${name}: KL from the fp16 cache over ${scored} tokens`,
    ]);
    assertMatch(texts(tree, "role-title-subtitle")[0], /^fp16 is the reference/);

    for (const bad of [`${dir}/no/such/dir/kl.svg`, dir]) {
      const r = await innerq([...base, "--plot", bad]);
      assertEquals(r.code, 1, r.stderr);
      assertEquals(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert(r.stderr.startsWith(`innerq: --plot ${bad}: cannot write (`), r.stderr);
      assertEquals(r.stdout, ""); // failed before the run
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
