// `innerq ppl --plot`: mean KL divergence from the fp16 cache against KV-cache bytes per token, one
// labelled mark per spec, as SVG text. The chart is a Vega-Lite spec compiled to Vega and rendered
// by a headless Vega view (renderer "none": no browser, canvas or fonts needed for SVG).
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";

/** One scored spec, as `innerq ppl` reports it. */
export interface KlPoint {
  /** The spec as given on the command line: the mark's label. */
  spec: string;
  bytesPerToken: number;
  /** Mean KL(p_fp16 || p_spec) in nats; 0 or NaN (nothing scored) cannot sit on the log axis. */
  meanKl: number;
  /** Agreement of the argmax with the reference's, 0..1. */
  top1: number;
  ppl: number;
}

export interface KlPlotOptions {
  /** The chart's title, e.g. the model and how many tokens were scored. */
  title: string;
  /** The reference run (fp16): not a mark, since its KL is 0, but a dashed rule at its bytes per
   * token, named in the subtitle. */
  reference?: { spec: string; bytesPerToken: number; ppl: number };
  /** More subtitle lines, e.g. the text scored. */
  notes?: string[];
  /** The plot area in pixels (axes, title and legend are outside it). */
  width?: number;
  height?: number;
}

/** The family a spec belongs to, for its colour and shape: innerq, kivi, or dense (fp16, fp32). */
export function specFamily(spec: string): "innerq" | "kivi" | "dense" {
  const kind = spec.split(":")[0].trim().toLowerCase();
  return kind === "innerq" || kind === "kivi" ? kind : "dense";
}

const FAMILIES = ["innerq", "kivi", "dense"];
const COLOURS = ["#1f77b4", "#d62728", "#555555"];
const SHAPES = ["circle", "square", "triangle-up"];
const FONT_SIZE = 11;
/** Pixels between a mark and its label, a label's height, and the width of one of its characters
 * (an estimate: there are no font metrics here). */
const GAP = 8, LINE = FONT_SIZE + 3, CHAR = 0.6 * FONT_SIZE;

/** The byte unit that reads best for a set of sizes: B, KiB or MiB. */
function byteUnit(max: number): { name: string; size: number } {
  if (max >= 10 * 1024 * 1024) return { name: "MiB", size: 1024 * 1024 };
  if (max >= 10 * 1024) return { name: "KiB", size: 1024 };
  return { name: "B", size: 1 };
}

/** The end of a linear axis from 0 that holds x: a whole number of steps of 1, 2 or 5 times a
 * power of ten, about six steps. */
function niceCeil(x: number): number {
  if (!(x > 0)) return 1;
  const raw = x / 6, p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * p).find((v) => v >= raw)!;
  return Math.ceil(x / step - 1e-9) * step;
}

const fmt = (x: number) => Number(x.toPrecision(4)).toString();

/** The log axis: the data with a margin, at least one decade; ticks at the powers of ten, and at 2
 * and 5 times them too when the axis spans less than three decades. */
function logAxis(values: number[]): { domain: [number, number]; ticks: number[] } {
  let lo = values.length ? Math.log10(Math.min(...values)) : -4;
  let hi = values.length ? Math.log10(Math.max(...values)) : 0;
  const margin = Math.max(0.08 * (hi - lo), (1 - (hi - lo)) / 2);
  lo -= margin;
  hi += margin;
  const ticks: number[] = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of hi - lo < 3 ? [1, 2, 5] : [1]) {
      const t = Number((m * 10 ** e).toPrecision(1));
      if (Math.log10(t) >= lo && Math.log10(t) <= hi) ticks.push(t);
    }
  }
  return { domain: [10 ** lo, 10 ** hi], ticks };
}

/** Where each label goes, in pixels of the plot area: right of its mark (left where it would leave
 * the plot), level with it unless labels beside one another would overlap, then spread up and down
 * just enough, each group of touching labels centred on its marks (a moved label gets a leader
 * line). */
function placeLabels(
  marks: { px: number; py: number; label: string }[],
  width: number,
  height: number,
): { side: "left" | "right"; x: number; y: number }[] {
  const placed = marks.map((m) => {
    const w = m.label.length * CHAR;
    const side: "left" | "right" = m.px + GAP + w <= width || m.px - GAP - w < 0 ? "right" : "left";
    const x0 = side === "right" ? m.px + GAP : m.px - GAP - w;
    return { side, y: m.py, x0, x1: x0 + w };
  });
  for (const side of ["right", "left"] as const) {
    // columns: labels on this side whose spans across overlap, directly or through others
    const order = placed.map((_, i) => i).filter((i) => placed[i].side === side)
      .sort((a, b) => placed[a].x0 - placed[b].x0);
    let column: number[] = [], end = -Infinity;
    for (const i of [...order, -1]) {
      if (i < 0 || placed[i].x0 >= end) {
        align(column, placed, side);
        dodge(column.sort((a, b) => marks[a].py - marks[b].py), marks, placed, height);
        column = [];
        end = -Infinity;
      }
      if (i >= 0) {
        column.push(i);
        end = Math.max(end, placed[i].x1);
      }
    }
  }
  return placed.map(({ side, y, x0, x1 }) => ({ side, y, x: side === "right" ? x0 : x1 }));
}

/** Lines up the labels of a column whose marks are a few pixels apart (e.g. 24 and 26 KiB), so
 * that a label does not cross its neighbours' marks. */
function align(column: number[], placed: { x0: number; x1: number }[], side: "left" | "right") {
  // where each label's text starts (right of its mark) or ends (left of it), before any moves
  const anchor = column.map((i) => side === "right" ? placed[i].x0 : placed[i].x1);
  for (const [k, i] of column.entries()) {
    const near = anchor.filter((a) => Math.abs(a - anchor[k]) <= 2 * GAP);
    const shift = (side === "right" ? Math.max(...near) : Math.min(...near)) - anchor[k];
    placed[i].x0 += shift;
    placed[i].x1 += shift;
  }
}

/** Spreads a column of labels (sorted by their marks' heights) so that none overlaps the next. */
function dodge(
  column: number[],
  marks: { py: number }[],
  placed: { y: number }[],
  height: number,
): void {
  interface Group {
    first: number;
    n: number;
    sum: number;
    top: number;
  }
  const settle = (g: Group) => {
    const top = g.sum / g.n - (g.n - 1) * LINE / 2;
    g.top = Math.max(LINE / 2, Math.min(top, height - LINE / 2 - (g.n - 1) * LINE));
  };
  const groups: Group[] = [];
  for (const [k, i] of column.entries()) {
    let g: Group = { first: k, n: 1, sum: marks[i].py, top: 0 };
    settle(g);
    while (groups.length > 0) {
      const last = groups[groups.length - 1];
      if (last.top + last.n * LINE <= g.top) break;
      groups.pop();
      g = { first: last.first, n: last.n + g.n, sum: last.sum + g.sum, top: 0 };
      settle(g);
    }
    groups.push(g);
  }
  for (const g of groups) {
    for (let k = 0; k < g.n; k++) placed[column[g.first + k]].y = g.top + k * LINE;
  }
}

/** The Vega-Lite spec of the chart. */
export function klPlotSpec(points: KlPoint[], opts: KlPlotOptions): TopLevelSpec {
  const width = opts.width ?? 560, height = opts.height ?? 400;
  // a log axis cannot show KL 0 (a spec identical to the reference) or NaN (nothing scored)
  const shown = points.filter((p) => Number.isFinite(p.meanKl) && p.meanKl > 0);
  const off = points.filter((p) => !shown.includes(p));
  const ref = opts.reference;
  const unit = byteUnit(Math.max(ref?.bytesPerToken ?? 0, ...points.map((p) => p.bytesPerToken)));
  const subtitle: string[] = [];
  if (ref) {
    subtitle.push(
      `${ref.spec} is the reference (KL 0, ppl ${fmt(ref.ppl)}): the dashed line at ` +
        `${fmt(ref.bytesPerToken / unit.size)} ${unit.name}/token`,
    );
  }
  subtitle.push(
    `labels: the spec, and its top-1 agreement with ${ref?.spec ?? "the reference"} ` +
      "(same most likely next token)",
  );
  if (off.length > 0) {
    subtitle.push(
      "not drawn: " +
        off.map((p) => `${p.spec} (${Number.isFinite(p.meanKl) ? "KL 0" : "no tokens scored"})`)
          .join(", "),
    );
  }
  if (shown.length === 0) subtitle.push("no spec with a KL above 0: nothing to draw");
  subtitle.push(...(opts.notes ?? []));

  const xMax = niceCeil(
    Math.max(ref?.bytesPerToken ?? 0, ...shown.map((p) => p.bytesPerToken)) / unit.size * 1.05,
  );
  const yAxis = logAxis(shown.map((p) => p.meanKl));
  const [ly0, ly1] = yAxis.domain.map(Math.log10);
  const toPx = (x: number, kl: number) => ({
    px: x / xMax * width,
    py: (1 - (Math.log10(kl) - ly0) / (ly1 - ly0)) * height,
  });
  const fromPx = (px: number, py: number) => ({
    x: px / width * xMax,
    kl: 10 ** (ly0 + (1 - py / height) * (ly1 - ly0)),
  });
  const marks = shown.map((p) => {
    const x = p.bytesPerToken / unit.size;
    const label = `${p.spec} ${(100 * p.top1).toFixed(1)}%`;
    return {
      spec: p.spec,
      family: specFamily(p.spec),
      x,
      kl: p.meanKl,
      label,
      ...toPx(x, p.meanKl),
    };
  });
  const places = placeLabels(marks, width, height);
  const values = marks.map((m, i) => {
    const { side, x, y } = places[i];
    // where the label's text starts (Vega-Lite has no pixel offsets on a continuous y axis, so the
    // spread labels are placed in the axes' units) and its leader line from the mark
    const at = fromPx(x, y);
    const lead = fromPx(m.px + (side === "right" ? 5 : -5), m.py);
    return {
      spec: m.spec,
      family: m.family,
      x: m.x,
      kl: m.kl,
      label: m.label,
      side,
      labelX: at.x,
      labelKl: at.kl,
      leadX: lead.x,
      leader: Math.abs(y - m.py) > 2 || Math.abs(x - m.px) > GAP + 2,
    };
  });

  const families = FAMILIES.filter((f) => values.some((v) => v.family === f));
  const x = {
    field: "x",
    type: "quantitative",
    title: `KV cache bytes per token (${unit.name})`,
    scale: { domain: [0, xMax], nice: false },
  } as const;
  const y = {
    field: "kl",
    type: "quantitative",
    title: "mean KL(fp16 ‖ spec), nats (log scale)",
    scale: { type: "log", domain: yAxis.domain, nice: false },
    axis: {
      values: yAxis.ticks,
      labelExpr: "datum.value >= 0.001 ? format(datum.value, '~g') : format(datum.value, '~e')",
    },
  } as const;
  const colour = {
    field: "family",
    type: "nominal",
    title: "cache",
    scale: { domain: families, range: families.map((f) => COLOURS[FAMILIES.indexOf(f)]) },
    ...(families.length === 0 ? { legend: null } : {}),
  } as const;
  const shape = {
    field: "family",
    type: "nominal",
    title: "cache",
    scale: { domain: families, range: families.map((f) => SHAPES[FAMILIES.indexOf(f)]) },
  } as const;
  const text = (side: "left" | "right") => ({
    name: `labels_${side}`,
    transform: [{ filter: `datum.side === '${side}'` }],
    mark: {
      type: "text",
      align: side === "right" ? "left" : "right",
      baseline: "middle",
      fontSize: FONT_SIZE,
      aria: false, // its position is the label's, not the spec's: the point carries the values
    },
    encoding: {
      x: { ...x, field: "labelX" },
      y: { ...y, field: "labelKl" },
      text: { field: "label" },
      color: colour,
    },
  });

  const layers: unknown[] = [
    {
      name: "leaders",
      transform: [{ filter: "datum.leader" }],
      mark: { type: "rule", strokeWidth: 0.7, color: "#999", aria: false },
      encoding: {
        x: { ...x, field: "leadX" },
        x2: { field: "labelX" },
        y: { ...y, field: "kl" },
        y2: { field: "labelKl" },
      },
    },
    {
      name: "points",
      mark: { type: "point", filled: true, size: 70, opacity: 1 },
      encoding: { x, y, color: colour, shape },
    },
    text("right"),
    text("left"),
  ];
  if (ref) {
    const at = [{ x: ref.bytesPerToken / unit.size, label: `${ref.spec} (reference)` }];
    layers.unshift(
      {
        name: "reference_rule",
        data: { values: at },
        mark: { type: "rule", strokeDash: [5, 4], color: "#555" },
        encoding: { x: { field: "x", type: "quantitative" } },
      },
      {
        name: "reference_label",
        data: { values: at },
        mark: { type: "text", align: "right", baseline: "top", dx: -4, dy: 4, color: "#555" },
        encoding: {
          x: { field: "x", type: "quantitative" },
          y: { value: 0 },
          text: { field: "label" },
        },
      },
    );
  }
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: { text: opts.title, subtitle, anchor: "start", subtitleFontSize: FONT_SIZE },
    width,
    height,
    background: "white",
    padding: 12,
    data: { values },
    layer: layers,
    config: { font: "sans-serif", axis: { labelFontSize: FONT_SIZE, titleFontSize: 12 } },
  } as TopLevelSpec;
}

/** The chart as SVG text. Vega's warnings are dropped (the spec draws none: see test/plot_test.ts)
 * and errors throw. */
export async function klPlotSvg(points: KlPoint[], opts: KlPlotOptions): Promise<string> {
  const { spec } = compile(klPlotSpec(points, opts), { logger: vega.logger(vega.Error) });
  const view = new vega.View(vega.parse(spec), { renderer: "none", logLevel: vega.Error });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
