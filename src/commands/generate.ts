// `innerq generate`: tokens streamed to stdout, stats on stderr.
import { parseArgs } from "node:util";
import { Transformer } from "../engine/forward.ts";
import { loadConfig } from "../model/config.ts";
import { generate, GenerationStats } from "../engine/generate.ts";
import { DEFAULT_SAMPLING, Sampler, type SamplingParams } from "../engine/sampler.ts";
import { StopMatcher, StreamDecoder, TextTokenizer } from "../tokenizer.ts";
import {
  defaultModel,
  deviceFlag,
  EXIT,
  formatBytes,
  formatCount,
  intFlag,
  kvSpecFlag,
  numberFlag,
  openBackend,
  progressBar,
  UsageError,
} from "./common.ts";

export const GENERATE_HELP = `innerq generate: generate text from a prompt

Usage: innerq generate [options] [PROMPT...]
The prompt is the arguments, or -f FILE, or standard input when it is piped or PROMPT is "-".
Text goes to stdout as it is generated; stats go to stderr.

Model and runtime
  -m, --model DIR        Hugging Face model directory (config.json, *.safetensors, tokenizer.json);
                         default: ../shared/models/gsmwiki-28m, else a tiny random-weight model
  -c, --ctx N            context length: tokens the KV cache holds (default: the model's
                         max_position_embeddings, at most 4096)
      --kv SPEC          KV cache: fp16 (default), fp32, innerq:k4v2[,opts], kivi:k2v2[,opts]
                         (see innerq info --help and docs/kv-cache.md)
      --device D         auto (default: CUDA when present), cuda or cpu
  -t, --threads N        CPU threads (default: all cores)
Prompt
  -f, --file FILE        read the prompt from FILE
      --chat             wrap the prompt in the model's chat template (tokenizer_config.json)
      --system TEXT      system message for --chat
Sampling (llama.cpp's names and defaults)
  -n, --max-tokens N     tokens to generate (default 256)
      --temp T           temperature; 0 = greedy (default ${DEFAULT_SAMPLING.temperature})
      --top-k K          0 = off (default ${DEFAULT_SAMPLING.topK})
      --top-p P          1 = off (default ${DEFAULT_SAMPLING.topP})
      --min-p P          0 = off (default ${DEFAULT_SAMPLING.minP})
      --repeat-penalty X 1 = off (default ${DEFAULT_SAMPLING.repeatPenalty})
      --repeat-last-n N  tokens the penalty looks back over (default ${DEFAULT_SAMPLING.repeatLastN})
  -s, --seed N           random seed; the same seed gives the same text (default: random)
      --stop TEXT        stop when TEXT is generated (repeatable); TEXT itself is not printed
      --ignore-eos       keep generating past end-of-sequence tokens
Output
      --json             print one JSON object (text and stats) at the end instead of streaming
  -q, --quiet            no stats or notices on stderr
  -h, --help             this help

Exit codes: 0 done, 1 error (bad model files, native failure), 2 bad command line,
130 interrupted by Ctrl-C (the text generated so far is printed first).
`;

const OPTIONS = {
  model: { type: "string", short: "m" },
  ctx: { type: "string", short: "c" },
  kv: { type: "string" },
  device: { type: "string" },
  threads: { type: "string", short: "t" },
  file: { type: "string", short: "f" },
  chat: { type: "boolean" },
  system: { type: "string" },
  "max-tokens": { type: "string", short: "n" },
  temp: { type: "string" },
  "top-k": { type: "string" },
  "top-p": { type: "string" },
  "min-p": { type: "string" },
  "repeat-penalty": { type: "string" },
  "repeat-last-n": { type: "string" },
  seed: { type: "string", short: "s" },
  stop: { type: "string", multiple: true },
  "ignore-eos": { type: "boolean" },
  json: { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
} as const;

export function parseGenerateArgs(args: string[]) {
  try {
    return parseArgs({ args, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

function samplingParams(v: ReturnType<typeof parseGenerateArgs>["values"]): SamplingParams {
  const d = DEFAULT_SAMPLING;
  return {
    temperature: numberFlag("temp", v.temp, 0) ?? d.temperature,
    topK: intFlag("top-k", v["top-k"], 0) ?? d.topK,
    topP: numberFlag("top-p", v["top-p"], 0, 1) ?? d.topP,
    minP: numberFlag("min-p", v["min-p"], 0, 1) ?? d.minP,
    repeatPenalty: numberFlag("repeat-penalty", v["repeat-penalty"], 0.01) ?? d.repeatPenalty,
    repeatLastN: intFlag("repeat-last-n", v["repeat-last-n"], 0) ?? d.repeatLastN,
    seed: intFlag("seed", v.seed, 0) ?? Math.floor(Math.random() * 2 ** 32),
  };
}

async function readPrompt(positionals: string[], file: string | undefined): Promise<string> {
  if (file !== undefined) {
    if (positionals.length) {
      throw new UsageError("give the prompt either as arguments or with -f, not both");
    }
    try {
      return await Deno.readTextFile(file);
    } catch (e) {
      throw new UsageError(`-f ${file}: cannot read the prompt file (${(e as Error).message})`);
    }
  }
  const fromStdin = positionals.length === 1 && positionals[0] === "-" ||
    positionals.length === 0 && !Deno.stdin.isTerminal();
  if (fromStdin) return await new Response(Deno.stdin.readable).text();
  if (positionals.length === 0) {
    throw new UsageError("no prompt: give it as an argument, with -f FILE, or on stdin");
  }
  return positionals.join(" ");
}

/** Writes text to stdout; false once stdout is closed (e.g. `| head`), so generation can stop. */
async function writeOut(text: string): Promise<boolean> {
  if (!text) return true;
  const bytes = new TextEncoder().encode(text);
  try {
    for (let off = 0; off < bytes.length;) off += await Deno.stdout.write(bytes.subarray(off));
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.BrokenPipe) return false;
    throw e;
  }
}

function chatMessages(prompt: string, system: string | undefined) {
  const messages = system === undefined ? [] : [{ role: "system", content: system }];
  return [...messages, { role: "user", content: prompt }];
}

const round = (x: number) => Math.round(x * 100) / 100;

/** Bytes one decode step reads: the weights it uses plus the KV cache at the mean decode position. */
function decodeBytesPerToken(model: Transformer, stats: GenerationStats): number {
  const meanContext = stats.promptTokens + stats.decodeTokens / 2;
  return model.weights.decodeBytes + model.cache.bytesPerToken * meanContext;
}

export async function runGenerate(args: string[]): Promise<number> {
  const { values: v, positionals } = parseGenerateArgs(args);
  if (v.help) {
    console.log(GENERATE_HELP);
    return EXIT.ok;
  }
  const quiet = v.quiet ?? false;
  const params = samplingParams(v);
  const maxTokens = intFlag("max-tokens", v["max-tokens"], 1) ?? 256;
  const ctxFlag = intFlag("ctx", v.ctx, 2);
  const threads = intFlag("threads", v.threads, 1);
  const kv = kvSpecFlag(v.kv ?? "fp16");
  const device = deviceFlag(v.device);
  if (v.system !== undefined && !v.chat) throw new UsageError("--system needs --chat");
  const prompt = await readPrompt(positionals, v.file);

  const dir = v.model ?? await defaultModel(quiet);
  const loadStart = performance.now();
  const config = await loadConfig(dir);
  const tokenizer = await TextTokenizer.load(dir);
  const promptText = v.chat ? tokenizer.applyChatTemplate(chatMessages(prompt, v.system)) : prompt;
  const promptIds = Int32Array.from(tokenizer.encode(promptText, { addSpecialTokens: !v.chat }));
  const ctx = ctxFlag ??
    Math.min(config.maxPositionEmbeddings, config.slidingWindow ?? Infinity, 4096);
  if (config.slidingWindow !== null && ctx > config.slidingWindow) {
    // attention past the window would differ from the model's; refuse rather than be subtly wrong
    throw new UsageError(
      `--ctx ${ctx} exceeds the model's sliding window of ${config.slidingWindow} tokens`,
    );
  }

  using backend = openBackend(device, threads, quiet);
  const progress = progressBar("loading weights", quiet);
  using model = await Transformer.load(backend, dir, config, {
    ctx,
    kv,
    onProgress: progress.update,
  });
  progress.end();
  const loadMs = performance.now() - loadStart;

  using sampler = new Sampler(backend, params, config.vocabSize);
  const abort = new AbortController();
  let interrupted = false;
  const onInterrupt = () => {
    interrupted = true;
    abort.abort();
  };
  const stats = new GenerationStats();
  const decoder = new StreamDecoder(tokenizer, { skipSpecialTokens: true });
  const stops = new StopMatcher(v.stop ?? []);
  const generated: number[] = [];
  let text = "";
  const emit = async (piece: string) => {
    text += piece;
    if (!v.json && !(await writeOut(piece))) abort.abort(); // stdout closed: stop quietly
  };
  Deno.addSignalListener("SIGINT", onInterrupt);
  try {
    // a chat turn ends with the template's end token (tokenizer_config.json eos_token) too
    const chatEnd = v.chat && tokenizer.eosTokenId !== undefined ? [tokenizer.eosTokenId] : [];
    const eosTokenIds = v["ignore-eos"] ? [] : [...config.eosTokenIds, ...chatEnd];
    for await (
      const id of generate(model, promptIds, sampler, {
        maxTokens,
        eosTokenIds,
        signal: abort.signal,
      }, stats)
    ) {
      generated.push(id);
      const { emit: piece, stopped } = stops.push(decoder.push(id));
      await emit(piece);
      if (stopped) {
        stats.stopReason = "stop";
        break;
      }
    }
    if (stats.stopReason !== "stop") await emit(stops.push(decoder.flush()).emit + stops.flush());
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
  }

  const report = {
    model: dir,
    architecture: config.architecture,
    params: model.weights.params,
    backend: backend.deviceInfo().name,
    kv: model.cache.spec,
    ctx,
    seed: params.seed,
    promptTokens: stats.promptTokens,
    generatedTokens: generated.length,
    stopReason: stats.stopReason,
    loadMs: round(loadMs),
    prefillMs: round(stats.prefillMs),
    prefillTokensPerSecond: round(stats.prefillTokensPerSecond),
    timeToFirstTokenMs: round(stats.firstTokenMs),
    decodeTokens: stats.decodeTokens,
    decodeTokensPerSecond: round(stats.decodeTokensPerSecond),
    decodeGBPerSecond: round(
      (decodeBytesPerToken(model, stats) * stats.decodeTokensPerSecond) / 1e9,
    ),
    kvBytesPerToken: model.cache.bytesPerToken,
    kvBytesUsed: model.cache.bytesPerToken * (stats.promptTokens + generated.length),
  };
  if (v.json) {
    console.log(JSON.stringify({ text, tokens: generated, ...report }));
  } else {
    if (text && !text.endsWith("\n")) await writeOut("\n");
    if (!quiet) printStats(report);
  }
  return interrupted ? EXIT.interrupted : EXIT.ok;
}

function printStats(r: {
  model: string;
  architecture: string;
  params: number;
  backend: string;
  kv: string;
  ctx: number;
  seed: number;
  promptTokens: number;
  generatedTokens: number;
  stopReason: string;
  loadMs: number;
  prefillMs: number;
  prefillTokensPerSecond: number;
  timeToFirstTokenMs: number;
  decodeTokens: number;
  decodeTokensPerSecond: number;
  decodeGBPerSecond: number;
  kvBytesPerToken: number;
  kvBytesUsed: number;
}): void {
  const lines = [
    `model ${r.model} (${r.architecture}, ${
      formatCount(r.params)
    } params) on ${r.backend}, kv ${r.kv}, ctx ${r.ctx}, seed ${r.seed}`,
    `load ${(r.loadMs / 1000).toFixed(2)} s | prompt ${r.promptTokens} tokens, prefill ${
      r.prefillMs.toFixed(1)
    } ms ` +
    `(${r.prefillTokensPerSecond.toFixed(1)} tok/s) | first token ${
      r.timeToFirstTokenMs.toFixed(1)
    } ms`,
    `decode ${r.decodeTokens} tokens, ${r.decodeTokensPerSecond.toFixed(1)} tok/s, ${
      r.decodeGBPerSecond.toFixed(2)
    } GB/s | ` +
    `kv ${formatBytes(r.kvBytesPerToken)}/token, ${
      formatBytes(r.kvBytesUsed)
    } used | ${r.generatedTokens} generated, stop: ${r.stopReason}`,
  ];
  for (const line of lines) console.error(`innerq: ${line}`);
}
