#!/usr/bin/env bash
# The fidelity report of issue 8: `innerq ppl` over the first TOKENS of WikiText-2 test, the same
# tokens for every spec, on both shared models; one JSON per model into OUT (and an SVG plot each).
# Usage: scripts/kv_report.sh [TOKENS] [OUT] [extra ppl flags]
set -euo pipefail
tokens="${1:-32768}"
out="${2:-.cache/kv_report}"
shift 2 || shift $# || true
text=../shared/data/wikitext-2/test.txt
specs=(
  innerq:k8v8 innerq:k4v4 innerq:k4v2 innerq:k3v2 innerq:k2v2,kaxis=channels
  innerq:k2v2,kaxis=channels,norm=off innerq:k2v2 kivi:k4v4 kivi:k4v2 kivi:k2v2
)
mkdir -p "$out"
for model in gsmwiki-28m gsmwiki-28m-kout; do
  args=()
  for s in "${specs[@]}"; do args+=(--kv "$s"); done
  ./innerq ppl --model "../shared/models/$model" --file "$text" --limit "$tokens" --ctx 1024 \
    "${args[@]}" --json "$@" >"$out/$model.json"
done
