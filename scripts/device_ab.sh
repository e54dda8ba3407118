#!/usr/bin/env bash
# One GPU-machine call comparing two builds of the CUDA library: the CUDA tests on the new one,
# the decode kernels of both interleaved, the store kernels' own times under ncu, and end to end
# at 1k and 128k on a random Llama-3-8B, fp16 and the quantized specs. Both libraries are built
# here beforehand (the device's make takes minutes) and carried, e.g. xz-compressed in .cache/:
#   source .device/env.sh; scripts/device_ab.sh BEFORE.so [AFTER.so]
# DEPTHS (kernels, default 1024,131072) and SPECS (default innerq:k4v4 innerq:k4v2 innerq:k2v2)
# narrow it; STEPS (default "tests kernels store e2e") picks the parts, "prompts" adds prompts of
# PROMPTS tokens (default 2,16,64,4096, in 256-token calls) at depth 32k and 128k and pp4096 at 0 /
# 32k / 128k, fp16 and SPECS, and "prompt-ncu" the prompt kernel of both builds under ncu (one
# launch of a NCU_PROMPT-token call at depth 128k, default 32, fp16 and SPECS); PEERS, a carried
# copy of ../shared/peers, adds the SDPA decode peer (and with "prompts"
# scripts/prompt_attn_peer.py) to the same call; logs go to $OUT.
set -uo pipefail
source scripts/device_env.sh
before="${1:?usage: scripts/device_ab.sh BEFORE.so [AFTER.so]}"
after="${2:-build/libinnerq_cuda.so}"
out="${OUT:-/tmp/out}"
depths="${DEPTHS:-1024,131072}"
specs="${SPECS:-innerq:k4v4 innerq:k4v2 innerq:k2v2}"
steps=" ${STEPS:-tests kernels store e2e} "
step() { [[ "$steps" == *" $1 "* ]]; }
mkdir -p "$out"
make -s -j"$(nproc)" cpu || exit 1 # the tests compare against the C backend
for lib in "$before" "$after"; do [ -f "$lib" ] || { echo "device_ab: no library at $lib"; exit 1; }; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dir=/tmp/models/llama3-8b
if { step e2e || step prompts || step prompt-ncu; } && [ ! -f "$dir/config.json" ]; then
  deno run -A --cached-only scripts/random_model.ts --shape llama3-8b --shards 4 "$dir" > /dev/null 2>&1 &
fi
run() { # run LIB COMMAND...: a deno command against one library
  local lib="$1"
  shift
  INNERQ_CUDA_LIB="$lib" deno "$@"
}
lib_of() { [ "$1" = after ] && echo "$after" || echo "$before"; } # lib_of SIDE
under_ncu() { # under_ncu SIDE LOG KERNELS NCU-OPTIONS... COMMAND...: SIDE's kernels KERNELS (regex)
  local lib log=$2 kernels=$3
  lib=$(lib_of "$1")
  shift 3
  INNERQ_CUDA_LIB="$lib" timeout 120 ncu --target-processes all --kernel-name regex:"$kernels" "$@" \
    > "$log" 2>&1
}
if step tests; then
  echo "== CUDA tests ($after)"
  run "$after" test -A --cached-only test/cuda_test.ts test/cuda_kvq_test.ts > "$out/tests.log" 2>&1
  grep -E "^(ok|FAILED) \||=> " "$out/tests.log" | tail -6
fi
if [ -n "${PEERS:-}" ] && step kernels; then
  echo "== SDPA flash peer (us) and copy bandwidth"
  python3 "$PEERS/torch_decode_attn_peer.py" > "$out/peer.log" 2>&1
  grep -E "^copy" "$out/peer.log"
  grep -oE '"T": [0-9]+, "MB": [0-9.]+, "sdpa_flash_us": [0-9.]+' "$out/peer.log"
fi
if [ -n "${PEERS:-}" ] && step prompts; then
  echo "== SDPA prompt peer (us)"
  python3 scripts/prompt_attn_peer.py 2>&1 | tee "$out/prompt_peer.log"
fi
step kernels && echo "== decode kernels, us (before / after)"
for round in 1 2; do
  step kernels || break
  for side in before after; do
    run "$(lib_of $side)" run -A --cached-only cli.ts bench --kernels --device cuda -r 5 -d "$depths" 2>&1 |
      grep -E "^\| attn (fp16|innerq)" | sed "s/^/$side /"
  done
done
if step store && command -v ncu > /dev/null; then
  echo "== store kernels under ncu, 200 tokens stored one at a time (us)"
  for kv in fp16 $specs; do
    for side in before after; do
      csv="$out/ncu_${side}_${kv/:/_}.csv"
      under_ncu $side "$csv" "quantize|rows_kernel|kv_store" --metrics gpu__time_duration.sum --csv \
        deno run -A --cached-only scripts/store_probe.ts --kv "$kv" --tokens 200
      python3 - "$csv" "$side $kv" <<'PY'
import csv, sys, collections
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
times = collections.defaultdict(list)
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        v = float(r["Metric Value"].replace(",", ""))
        times[r["Kernel Name"].split("(")[0]].append(v / 1000 if r["Metric Unit"] in ("ns", "nsecond") else v)
for k, v in times.items():
    print(sys.argv[2], k, "calls", len(v), "mean %.2f" % (sum(v) / len(v)), "max %.2f" % max(v))
PY
    done
  done
fi
wait
bench() { # bench SIDE SPEC ARGS...: a line "side spec test depth t/s" per row, or why it failed
  local side=$1 kv=$2 log
  shift 2
  log=$(run "$(lib_of "$side")" run -A --cached-only cli.ts bench --device cuda --model "$dir" --fill direct \
    --kv "$kv" "$@" 2>&1) || { echo "$side $kv failed: $(tail -1 <<< "$log")"; return; }
  grep -E '^\| (pp|tg)' <<< "$log" | awk -F'|' '{print $2 $3 $4}' | tr -s ' ' | sed "s/^/$side $kv/"
}
if step prompts; then
  echo "== prompts in 256-token calls at 32k / 128k, tokens/s (before / after)"
  for kv in fp16 $specs; do
    for side in before after; do
      bench $side "$kv" -p "${PROMPTS:-2,16,64,4096}" --chunk 256 -n 0 -d 32768,131072 -r 2
    done
  done
  echo "== pp4096 at 0 / 32k / 128k, tokens/s (before / after)"
  for kv in fp16 $specs; do
    for side in before after; do bench $side "$kv" -p 4096 --chunk 4096 -n 0 -d 0,32768,131072 -r 2; done
  done
fi
if step prompt-ncu && command -v ncu > /dev/null; then
  echo "== the prompt kernels under ncu: one launch of a ${NCU_PROMPT:-32}-token call at depth 128k"
  for kv in fp16 $specs; do
    for side in before after; do
      log="$out/ncu_prompt_${side}_${kv/:/_}.txt"
      under_ncu $side "$log" "prefill_rows_kernel|kp_dequant_kernel|kvq_mma_kernel" --launch-skip 40 \
        --launch-count 1 --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --section Occupancy deno run -A --cached-only cli.ts bench --device cuda --model "$dir" \
        --fill direct -n 0 -r 1 --kv "$kv" -p "${NCU_PROMPT:-32}" --chunk 256 -d 131072
      grep -E "_kernel|Duration|Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Achieved Occupancy" \
        "$log" | sed "s/^/$side $kv /"
    done
  done
fi
step e2e && echo "== end to end, tokens/s (before / after)"
for round in 1 2; do
  step e2e || break
  for kv in fp16 $specs; do
    for side in before after; do bench $side "$kv" -p 0 --chunk 4096 -n 32 -d 1024,131072 -r 3; done
  done
done
