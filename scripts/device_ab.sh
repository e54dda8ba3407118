#!/usr/bin/env bash
# One GPU-machine call comparing two builds of the CUDA library: the CUDA tests on the new one,
# the decode kernels of both interleaved, the store kernels' own times under ncu, and end to end
# at 1k and 128k on a random Llama-3-8B, fp16 and the quantized specs. Both libraries are built
# here beforehand (the device's make takes minutes) and carried, e.g. xz-compressed in .cache/:
#   source .device/env.sh; scripts/device_ab.sh BEFORE.so [AFTER.so]
# DEPTHS (kernels, default 1024,131072) and SPECS (default innerq:k4v4 innerq:k4v2 innerq:k2v2)
# narrow it; PEERS, a carried copy of ../shared/peers, adds the SDPA peer to the same call; logs go
# to $OUT.
set -uo pipefail
source scripts/device_env.sh
before="${1:?usage: scripts/device_ab.sh BEFORE.so [AFTER.so]}"
after="${2:-build/libinnerq_cuda.so}"
out="${OUT:-/tmp/out}"
depths="${DEPTHS:-1024,131072}"
specs="${SPECS:-innerq:k4v4 innerq:k4v2 innerq:k2v2}"
mkdir -p "$out"
make -s -j"$(nproc)" cpu || exit 1 # the tests compare against the C backend
for lib in "$before" "$after"; do [ -f "$lib" ] || { echo "device_ab: no library at $lib"; exit 1; }; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dir=/tmp/models/llama3-8b
if [ ! -f "$dir/config.json" ]; then
  deno run -A --cached-only scripts/random_model.ts --shape llama3-8b --shards 4 "$dir" > /dev/null 2>&1 &
fi
run() { # run LIB COMMAND...: a deno command against one library
  local lib="$1"
  shift
  INNERQ_CUDA_LIB="$lib" deno "$@"
}
echo "== CUDA tests ($after)"
run "$after" test -A --cached-only test/cuda_test.ts test/cuda_kvq_test.ts > "$out/tests.log" 2>&1
grep -E "^(ok|FAILED) \||=> " "$out/tests.log" | tail -6
if [ -n "${PEERS:-}" ]; then
  echo "== SDPA flash peer (us) and copy bandwidth"
  python3 "$PEERS/torch_decode_attn_peer.py" > "$out/peer.log" 2>&1
  grep -E "^copy" "$out/peer.log"
  grep -oE '"T": [0-9]+, "MB": [0-9.]+, "sdpa_flash_us": [0-9.]+' "$out/peer.log"
fi
echo "== decode kernels, us (before / after)"
for round in 1 2; do
  for side in before after; do
    lib=$before; [ $side = after ] && lib=$after
    run "$lib" run -A --cached-only cli.ts bench --kernels --device cuda -r 5 -d "$depths" 2>&1 |
      grep -E "^\| attn (fp16|innerq)" | sed "s/^/$side /"
  done
done
if command -v ncu > /dev/null; then
  echo "== store kernels under ncu, 200 tokens stored one at a time (us)"
  for kv in fp16 $specs; do
    for side in before after; do
      lib=$before; [ $side = after ] && lib=$after
      csv="$out/ncu_${side}_${kv/:/_}.csv"
      INNERQ_CUDA_LIB="$lib" timeout 90 ncu --target-processes all \
        --kernel-name regex:"quantize|rows_kernel|kv_store" --metrics gpu__time_duration.sum --csv \
        deno run -A --cached-only scripts/store_probe.ts --kv "$kv" --tokens 200 > "$csv" 2>&1
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
echo "== end to end, tokens/s (before / after)"
for round in 1 2; do
  for kv in fp16 $specs; do
    for side in before after; do
      lib=$before; [ $side = after ] && lib=$after
      echo "$side $kv $(run "$lib" run -A --cached-only cli.ts bench --device cuda --model "$dir" \
        --fill direct -p 0 --chunk 4096 -n 32 -d 1024,131072 -r 3 --kv "$kv" 2>&1 |
        grep -E '^\| tg|rror' | awk -F'|' '{print $3 $4}' | tr -s ' ' | tr '\n' ' ')"
    done
  done
done
