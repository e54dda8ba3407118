// What every command shares: usage errors, number flags, choosing the backend, finding the
// default model, the load progress bar and byte formatting.
import { Backend, type BackendKind } from "../../ffi/backend.ts";
import { libraryPath } from "../../ffi/library.ts";
import { type KvSpec, parseKvSpec } from "../kv/spec.ts";
import { writeRandomModel } from "../model/random_model.ts";

/** A mistake in the command line: exit code 2. */
export class UsageError extends Error {}

export const EXIT = { ok: 0, error: 1, usage: 2, interrupted: 130 } as const;

export function intFlag(name: string, value: string | undefined, min: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min) {
    throw new UsageError(`--${name}: expected an integer >= ${min}, got "${value}"`);
  }
  return n;
}

export function numberFlag(
  name: string,
  value: string | undefined,
  min: number,
  max = Infinity,
): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || n < min || n > max) {
    throw new UsageError(`--${name}: expected a number in [${min}, ${max}], got "${value}"`);
  }
  return n;
}

export type DeviceChoice = "auto" | BackendKind;

export function deviceFlag(value: string | undefined): DeviceChoice {
  const v = value ?? "auto";
  if (v !== "auto" && v !== "cpu" && v !== "cuda") {
    throw new UsageError(`--device: expected auto, cpu or cuda, got "${v}"`);
  }
  return v;
}

/** Opens the backend asked for; `auto` takes CUDA where its library loads and a GPU answers, else
 * the CPU, saying why on stderr unless quiet. */
export function openBackend(
  device: DeviceChoice,
  threads: number | undefined,
  quiet: boolean,
): Backend {
  if (device !== "auto") return Backend.open(device, { threads });
  try {
    Deno.statSync(libraryPath("cuda"));
  } catch {
    if (!quiet) console.error("innerq: CUDA backend not built here; running on the CPU");
    return Backend.open("cpu", { threads });
  }
  try {
    return Backend.open("cuda");
  } catch (e) {
    if (!quiet) {
      console.error(`innerq: no usable GPU (${(e as Error).message}); running on the CPU`);
    }
    return Backend.open("cpu", { threads });
  }
}

const repoRoot = new URL("../../", import.meta.url).pathname;
const sharedModel = new URL("../../../shared/models/gsmwiki-28m", import.meta.url).pathname;
const randomModel = `${repoRoot}.cache/random-tiny-llama`;

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** The model to run when no --model is given: the shared trained model where it is, else a tiny
 * random-weight model made once under .cache/. Says on stderr which, unless quiet. */
export async function defaultModel(quiet: boolean): Promise<string> {
  if (await exists(`${sharedModel}/config.json`)) {
    if (!quiet) console.error(`innerq: no --model given; using ${sharedModel} (trained weights)`);
    return sharedModel;
  }
  if (!(await exists(`${randomModel}/config.json`))) {
    await writeRandomModel(randomModel, "tiny", { seed: 1 });
  }
  if (!quiet) {
    console.error(
      `innerq: no --model given and no shared model found; using ${randomModel}, a tiny model with ` +
        "RANDOM weights: its text is gibberish. Pass --model DIR for a real model.",
    );
  }
  return randomModel;
}

export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

/** A progress bar on stderr for loads that take more than a second, on a terminal only. */
export function progressBar(
  label: string,
  quiet: boolean,
): { update(done: number, total: number): void; end(): void } {
  const start = performance.now();
  const show = !quiet && Deno.stderr.isTerminal();
  let shown = false;
  const encoder = new TextEncoder();
  return {
    update(done, total) {
      if (!show || performance.now() - start < 1000) return;
      shown = true;
      const width = 30, filled = Math.round((done / total) * width);
      const bar = "#".repeat(filled) + ".".repeat(width - filled);
      Deno.stderr.writeSync(
        encoder.encode(`\r${label} [${bar}] ${formatBytes(done)} / ${formatBytes(total)}`),
      );
    },
    end() {
      if (shown) Deno.stderr.writeSync(encoder.encode("\r\x1b[K"));
    },
  };
}

/** A --kv value parsed; a bad one is a usage error (exit 2) listing what is allowed. */
export function kvSpecFlag(text: string): KvSpec {
  try {
    return parseKvSpec(text);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** Progress of a long run on stderr, with elapsed time and ETA: a line redrawn in place on a
 * terminal, else one line every 10 s. `what` says what is done, e.g. "ppl 512/8192 tokens". */
export function etaProgress(
  quiet: boolean,
  what: (done: number, total: number) => string,
): { update(done: number, total: number): void; end(): void } {
  const start = performance.now(), terminal = Deno.stderr.isTerminal(), encoder = new TextEncoder();
  let last = start, shown = false;
  const secs = (ms: number) =>
    ms < 60e3 ? `${(ms / 1000).toFixed(0)} s` : `${(ms / 60e3).toFixed(1)} min`;
  return {
    update(done, total) {
      const now = performance.now();
      if (quiet || now - last < (terminal ? 250 : 10_000) || done === 0) return;
      last = now;
      const eta = (now - start) / done * (total - done);
      const line = `innerq: ${what(done, total)}, ${secs(now - start)}, ETA ${secs(eta)}`;
      shown = terminal;
      Deno.stderr.writeSync(encoder.encode(terminal ? `\r${line}\x1b[K` : `${line}\n`));
    },
    end() {
      if (shown) Deno.stderr.writeSync(encoder.encode("\r\x1b[K"));
    },
  };
}
