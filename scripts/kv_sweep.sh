#!/usr/bin/env bash
# The KV-cache sweep behind the defaults in docs/kv-cache.md: `innerq ppl` over WikiText-2 test with
# every spec below, on the two shared models (2-bit keys spelled out: innerq groups them over tokens
# by default since this sweep). Usage: scripts/kv_sweep.sh [TOKENS] [extra ppl flags]
set -euo pipefail
tokens="${1:-8192}"
shift || true
text=../shared/data/wikitext-2/test.txt
specs=(
  innerq:k8v8 innerq:k4v4 innerq:k4v2 innerq:k3v2 innerq:k2v2,kaxis=channels
  innerq:k4v4,g=64 innerq:k2v2,kaxis=channels,g=64 innerq:k2v2,kaxis=channels,gk=64,gv=32
  innerq:k2v2,kaxis=channels,gk=32,gv=64 innerq:k2v2,kaxis=channels,norm=rms
  innerq:k2v2,kaxis=channels,norm=off innerq:k2v2,kaxis=channels,hybrid=off
  innerq:k2v2,kaxis=channels,recent=64 innerq:k2v2,kaxis=channels,sink=0 innerq:k2v2
  kivi:k4v4 kivi:k4v2 kivi:k2v2 kivi:k2v2,norm=max
)
for model in gsmwiki-28m-kout gsmwiki-28m; do
  args=()
  for s in "${specs[@]}"; do args+=(--kv "$s"); done
  ./innerq ppl --model "../shared/models/$model" --file "$text" --limit "$tokens" --ctx 1024 \
    "${args[@]}" "$@"
done
