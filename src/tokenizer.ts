// Text <-> token ids for a Hugging Face model directory: tokenizer.json through
// @huggingface/tokenizers, chat templates (tokenizer_config.json) through @huggingface/jinja, and
// the two streaming helpers generation needs: StreamDecoder (ids to printable text as they come)
// and StopMatcher (holds back text that may begin a stop string).
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";

type Json = Record<string, unknown>;

export interface ChatMessage {
  role: string;
  content: string;
}

/** The JSON object in PATH; null when the file is absent and optional. */
async function readJsonFile(path: string, { optional = false } = {}): Promise<Json | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      if (optional) return null;
      throw new Error(`${path}: not found (the model directory needs a tokenizer.json)`);
    }
    throw new Error(`${path}: cannot read (${(e as Error).message})`);
  }
  try {
    const json = JSON.parse(text);
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      throw new Error("not an object");
    }
    return json;
  } catch (e) {
    throw new Error(`${path}: not a valid JSON object (${(e as Error).message})`);
  }
}

/** A special token in tokenizer_config.json: a string or an AddedToken object. */
function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (typeof v === "object" && v !== null && typeof (v as Json).content === "string") {
    return (v as Json).content as string;
  }
  return null;
}

function chatTemplateOf(config: Json | null): string | null {
  const t = config?.chat_template;
  if (typeof t === "string") return t;
  if (Array.isArray(t)) { // named templates: [{name, template}]; "default" is the one to use
    const named = t.find((x) => x?.name === "default") ?? t[0];
    return typeof named?.template === "string" ? named.template : null;
  }
  return null;
}

export class TextTokenizer {
  /** Highest id in the vocabulary or the added tokens, plus one. */
  readonly vocabSize: number;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  #template: Template | null;
  /** BOS/EOS ids that tokenizer_config.json asks for instead of the post-processor's; null: none. */
  #configBosEos: { prefix: number[]; suffix: number[] } | null;

  private constructor(readonly dir: string, readonly tokenizer: Tokenizer, config: Json | null) {
    const addedTokens = tokenizer.get_added_tokens_decoder();
    const ids = [...tokenizer.get_vocab(true).values(), ...addedTokens.keys()];
    this.vocabSize = ids.reduce((max, id) => Math.max(max, id), -1) + 1;
    this.bosToken = tokenText(config?.bos_token);
    this.eosToken = tokenText(config?.eos_token);
    const source = chatTemplateOf(config);
    this.#template = source === null ? null : new Template(source);
    this.#configBosEos = this.#configBosEosIds(config);
  }

  /** Like transformers, an add_bos_token or add_eos_token setting replaces the post-processor. */
  #configBosEosIds(config: Json | null) {
    if (!config || !("add_bos_token" in config || "add_eos_token" in config)) return null;
    const idIf = (wanted: unknown, token: string | null) => {
      const id = wanted === true && token !== null ? this.tokenToId(token) : undefined;
      return id === undefined ? [] : [id];
    };
    return {
      prefix: idIf(config.add_bos_token, this.bosToken),
      suffix: idIf(config.add_eos_token, this.eosToken),
    };
  }

  /** Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json. */
  static async load(dir: string): Promise<TextTokenizer> {
    const file = `${dir}/tokenizer.json`;
    const json = await readJsonFile(file);
    const config = await readJsonFile(`${dir}/tokenizer_config.json`, { optional: true });
    let tokenizer: Tokenizer;
    try {
      tokenizer = new Tokenizer(json!, config ?? {});
    } catch (e) {
      throw new Error(`${file}: not a tokenizer this tool can read (${(e as Error).message})`);
    }
    return new TextTokenizer(dir, tokenizer, config);
  }

  /** Token ids of text; addSpecialTokens adds what the post-processor adds (e.g. BOS), or what
   * tokenizer_config.json's add_bos_token / add_eos_token ask for when it sets them. */
  encode(text: string, { addSpecialTokens = true } = {}): number[] {
    if (!addSpecialTokens || this.#configBosEos === null) {
      return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    }
    const { prefix, suffix } = this.#configBosEos;
    const ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    return [...prefix, ...ids, ...suffix];
  }

  decode(ids: number[], { skipSpecialTokens = false } = {}): string {
    if (ids.length === 0) return ""; // the library rejects an empty list
    // No clean-up pass: it is transformers' (not tokenizer.json's) and mangles text ("a ." -> "a.",
    // "do n't" -> "don't"), so decoding would not round-trip nor stream consistently.
    return this.tokenizer.decode(ids, {
      skip_special_tokens: skipSpecialTokens,
      clean_up_tokenization_spaces: false,
    });
  }

  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  /** The id of tokenizer_config.json's eos_token (chat models end turns with it). */
  get eosTokenId(): number | undefined {
    return this.eosToken === null ? undefined : this.tokenToId(this.eosToken);
  }

  get hasChatTemplate(): boolean {
    return this.#template !== null;
  }

  /** The prompt text the model's chat template makes of these messages. */
  applyChatTemplate(messages: ChatMessage[], { addGenerationPrompt = true } = {}): string {
    if (!this.#template) {
      throw new Error(
        `${this.dir}: model has no chat template (tokenizer_config.json chat_template)`,
      );
    }
    return this.#template.render({
      messages,
      add_generation_prompt: addGenerationPrompt,
      bos_token: this.bosToken ?? "",
      eos_token: this.eosToken ?? "",
    });
  }
}

/** Turns ids into text as they arrive. A character can span several byte-level tokens and a
 * SentencePiece token's leading space depends on what precedes it, so each step decodes a short
 * window (after text-generation-inference's prefix/read offsets) and emits only what is new and
 * complete. The pieces concatenate to the decode of all ids. */
export class StreamDecoder {
  #ids: number[] = [];
  #prefixOffset = 0; // start of the window decoded for context
  #readOffset = 0; // ids before this are already emitted

  constructor(
    readonly tokenizer: TextTokenizer,
    readonly opts: { skipSpecialTokens?: boolean } = {},
  ) {}

  #decode(from: number, to = this.#ids.length): string {
    return this.tokenizer.decode(this.#ids.slice(from, to), {
      skipSpecialTokens: this.opts.skipSpecialTokens,
    });
  }

  push(id: number): string {
    this.#ids.push(id);
    const before = this.#decode(this.#prefixOffset, this.#readOffset);
    const now = this.#decode(this.#prefixOffset);
    if (now.length <= before.length || now.endsWith("\uFFFD")) return ""; // incomplete: wait
    this.#prefixOffset = this.#readOffset;
    this.#readOffset = this.#ids.length;
    return now.slice(before.length);
  }

  /** Whatever is still held (an incomplete character at the very end is emitted as it decodes). */
  flush(): string {
    const before = this.#decode(this.#prefixOffset, this.#readOffset);
    const now = this.#decode(this.#prefixOffset);
    this.#prefixOffset = this.#readOffset = this.#ids.length;
    return now.slice(before.length);
  }
}

/** Finds stop strings in streamed text: emits text that cannot be part of a stop, holds back a
 * tail that might begin one, and cuts the text before the first stop found. */
export class StopMatcher {
  #held = "";

  constructor(readonly stops: string[]) {
    if (stops.some((s) => s.length === 0)) throw new Error("--stop: a stop string cannot be empty");
  }

  push(text: string): { emit: string; stopped: boolean } {
    const s = this.#held + text;
    let first = -1;
    for (const stop of this.stops) {
      const at = s.indexOf(stop);
      if (at >= 0 && (first < 0 || at < first)) first = at;
    }
    if (first >= 0) {
      this.#held = "";
      return { emit: s.slice(0, first), stopped: true };
    }
    let hold = 0;
    for (const stop of this.stops) {
      for (let len = Math.min(stop.length - 1, s.length); len > hold; len--) {
        if (s.endsWith(stop.slice(0, len))) {
          hold = len;
          break;
        }
      }
    }
    this.#held = s.slice(s.length - hold);
    return { emit: s.slice(0, s.length - hold), stopped: false };
  }

  flush(): string {
    const rest = this.#held;
    this.#held = "";
    return rest;
  }
}
