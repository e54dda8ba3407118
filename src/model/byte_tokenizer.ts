// A real tokenizer.json for models made by this tool: GPT-2 style byte-level BPE over the 256
// bytes, a few English merges, and <|endoftext|> as the last id. Any text round-trips; both
// @huggingface/tokenizers and Python's tokenizers read it.

/** GPT-2's printable stand-in for each byte, so byte tokens are valid vocabulary strings. */
function byteToUnicode(): string[] {
  const printable: number[] = [];
  for (const [lo, hi] of [[0x21, 0x7e], [0xa1, 0xac], [0xae, 0xff]]) {
    for (let b = lo; b <= hi; b++) printable.push(b);
  }
  const chars: string[] = new Array(256);
  let next = 0;
  for (let b = 0; b < 256; b++) {
    chars[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + next++);
  }
  return chars;
}

/** Merge pairs in priority order; each pair's concatenation becomes a token. */
const MERGES: [string, string][] = [
  ["Ġ", "t"],
  ["h", "e"],
  ["Ġt", "he"],
  ["i", "n"],
  ["e", "r"],
  ["a", "n"],
  ["o", "n"],
  ["Ġ", "a"],
  ["t", "h"],
  ["Ġ", "s"],
  ["e", "n"],
  ["th", "e"],
];

export const END_OF_TEXT = "<|endoftext|>";

export function byteLevelTokenizerJson(): {
  json: Record<string, unknown>;
  vocabSize: number;
  eosId: number;
} {
  const vocab: Record<string, number> = {};
  byteToUnicode().forEach((ch, b) => (vocab[ch] = b));
  for (const [a, b] of MERGES) vocab[a + b] ??= Object.keys(vocab).length;
  const eosId = Object.keys(vocab).length;
  const byteLevel = {
    type: "ByteLevel",
    add_prefix_space: false,
    trim_offsets: true,
    use_regex: true,
  };
  const json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [{
      id: eosId,
      content: END_OF_TEXT,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    }],
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: byteLevel,
    decoder: byteLevel,
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: MERGES.map(([a, b]) => `${a} ${b}`),
    },
  };
  return { json, vocabSize: eosId + 1, eosId };
}
