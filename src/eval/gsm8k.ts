// GSM8K with few-shot chain of thought: the prompt, reading the data, the gold answer, the answer
// a model's output gives, and the accuracy's confidence interval.
import { type Exemplar, GSM8K_EXEMPLARS } from "./gsm8k_exemplars.ts";

/** One problem of a GSM8K jsonl file. */
export interface Gsm8kItem {
  question: string;
  /** The reference solution, ending "#### 42". */
  answer: string;
  /** The number after "####". */
  gold: number;
  /** 1-based line of the file it came from. */
  line: number;
}

/** The few-shot part every prompt starts with: "Q: ...\nA: ...\n\n" per exemplar, the first
 * `shots` of the eight. */
export function gsm8kPrefix(
  shots: number,
  exemplars: readonly Exemplar[] = GSM8K_EXEMPLARS,
): string {
  if (!Number.isSafeInteger(shots) || shots < 0 || shots > exemplars.length) {
    throw new RangeError(`shots must be an integer in 0..${exemplars.length}, got ${shots}`);
  }
  return exemplars.slice(0, shots).map((e) => `Q: ${e.question}\nA: ${e.answer}\n\n`).join("");
}

/** The whole prompt of one question: the few-shot prefix, then "Q: {question}\nA:". */
export function gsm8kPrompt(question: string, shots: number): string {
  return `${gsm8kPrefix(shots)}Q: ${question}\nA:`;
}

/** Where generation stops (the text from the first of them on is dropped). */
export const GSM8K_STOPS = ["\n\n", "Q:"];

/** A number as written in text: digits (thousands may be comma-separated: 1,200), optional
 * decimals, and a minus sign unless it follows a word or a number ("21-15" is 21 and 15). */
const NUMBER_SOURCE = String.raw`(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?`;
const NUMBER = new RegExp(NUMBER_SOURCE, "g");
/** "The answer is" then a number, past spaces, a colon, a dollar sign or markdown emphasis. */
const ANSWER_IS = new RegExp(String.raw`the answer is[\s:*$]*(${NUMBER_SOURCE})`, "i");

/** A number from its text: commas dropped; null when it is not a finite number. */
export function parseNumber(text: string): number | null {
  const clean = text.replaceAll(",", "").trim();
  if (!/^-?(?:\d+(?:\.\d*)?|\.\d+)$/.test(clean)) return null;
  const n = Number(clean);
  return Number.isFinite(n) ? n : null;
}

/** The answer an output gives: the number after "The answer is" where there is one, else the last
 * number in the output; null when it has no number. */
export function extractAnswer(output: string): number | null {
  const m = ANSWER_IS.exec(output);
  if (m) {
    const n = parseNumber(m[1]);
    if (n !== null) return n;
  }
  const all = output.match(NUMBER) ?? [];
  for (let i = all.length - 1; i >= 0; i--) {
    const n = parseNumber(all[i]);
    if (n !== null) return n;
  }
  return null;
}

/** The gold answer of a reference solution: the number after its last "####" (commas dropped);
 * null when there is none. */
export function parseGold(answer: string): number | null {
  const at = answer.lastIndexOf("####");
  if (at < 0) return null;
  return parseNumber(answer.slice(at + 4));
}

/** A prediction is right when it is the gold number. */
export function isCorrect(prediction: number | null, gold: number): boolean {
  return prediction !== null && prediction === gold;
}

/** Reads GSM8K items from jsonl text (blank lines skipped), at most `limit` of them. A line that is
 * not a JSON object with string "question" and "answer" (the answer with "#### N") throws, naming
 * `file` and the line. */
export function parseGsm8k(text: string, file: string, limit = Infinity): Gsm8kItem[] {
  const items: Gsm8kItem[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length && items.length < limit; i++) {
    const raw = lines[i].trim();
    if (raw === "") continue;
    const where = `${file}:${i + 1}`;
    let value;
    try {
      value = JSON.parse(raw);
    } catch (e) {
      throw new Error(`${where}: not JSON (${(e as Error).message})`);
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new Error(`${where}: expected a JSON object with "question" and "answer"`);
    }
    for (const key of ["question", "answer"]) {
      if (typeof value[key] !== "string") throw new Error(`${where}: no string "${key}"`);
    }
    const gold = parseGold(value.answer);
    if (gold === null) {
      throw new Error(`${where}: the answer does not end with "#### <number>"`);
    }
    items.push({ question: value.question, answer: value.answer, gold, line: i + 1 });
  }
  return items;
}

/** The Wilson score interval of a binomial proportion: `correct` of `n` at confidence z (1.96 for
 * 95%). [0, 1] when n is 0. */
export function wilsonInterval(
  correct: number,
  n: number,
  z = 1.959963984540054,
): [number, number] {
  if (n === 0) return [0, 1];
  const p = correct / n, z2 = z * z;
  const center = (p + z2 / (2 * n)) / (1 + z2 / n);
  const half = (z / (1 + z2 / n)) * Math.sqrt(p * (1 - p) / n + z2 / (4 * n * n));
  return [Math.max(0, center - half), Math.min(1, center + half)];
}
