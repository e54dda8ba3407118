// Draws the chart of `innerq ppl --plot` from a saved `innerq ppl --json` report, e.g. one made by
// scripts/kv_report.sh: deno run -A scripts/plot_ppl_json.ts REPORT.json OUT.svg
import { klPlotSvg, type KlPoint } from "../src/report/kl_plot.ts";

const [input, output] = Deno.args;
if (!input || !output) {
  console.error("usage: deno run -A scripts/plot_ppl_json.ts REPORT.json OUT.svg");
  Deno.exit(2);
}
const report = JSON.parse(await Deno.readTextFile(input));
const [reference, ...rest] = report.specs as KlPoint[];
const name = String(report.model).replace(/\/+$/, "").split("/").pop();
const svg = await klPlotSvg(rest, {
  title: `${name}: KL from the fp16 cache over ${report.tokens} tokens`,
  notes: [
    `${report.file}, windows of ${report.ctx} tokens, stride ${report.stride}, on ${report.backend}`,
  ],
  reference,
});
await Deno.writeTextFile(output, svg);
