#!/usr/bin/env -S deno run --allow-all
// innerq's command line: dispatches to a command and turns errors into one line and an exit code.
import { EXIT, UsageError } from "./src/commands/common.ts";
import { runGenerate } from "./src/commands/generate.ts";
import { runInfo } from "./src/commands/info.ts";
import { runBench } from "./src/commands/bench.ts";
import { runPpl } from "./src/commands/ppl.ts";
import { runEval } from "./src/commands/eval.ts";

const HELP = `innerq: run Llama-family language models with a compressed KV cache

Usage: innerq <command> [options]

Commands
  generate   generate text from a prompt (arguments, -f FILE or stdin)
  info       describe a model directory: shape, parameters, KV-cache bytes per token
  bench      prompt-processing and generation speed (llama-bench style), or --kernels
  ppl        perplexity of a text, and KL divergence from the fp16 cache for each --kv spec
  eval       task accuracy (gsm8k: few-shot chain of thought) for each --kv spec

Run \`innerq <command> --help\` for a command's options.
Exit codes: 0 done, 1 error, 2 bad command line, 130 interrupted.
`;

const COMMANDS: Record<string, (args: string[]) => Promise<number>> = {
  generate: runGenerate,
  info: runInfo,
  bench: runBench,
  ppl: runPpl,
  eval: runEval,
};

async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  if (command === undefined || command === "-h" || command === "--help" || command === "help") {
    console.log(HELP);
    return command === undefined ? EXIT.usage : EXIT.ok;
  }
  const run = COMMANDS[command];
  if (!run) {
    throw new UsageError(
      `unknown command "${command}" (commands: ${Object.keys(COMMANDS).join(", ")})`,
    );
  }
  return await run(rest);
}

try {
  Deno.exitCode = await main(Deno.args);
} catch (e) {
  const message = e instanceof Error ? e.message : String(e);
  console.error(`innerq: ${message}`);
  if (e instanceof UsageError) console.error("innerq: see `innerq --help`");
  if (Deno.env.get("INNERQ_DEBUG")) console.error(e);
  Deno.exitCode = e instanceof UsageError ? EXIT.usage : EXIT.error;
}
