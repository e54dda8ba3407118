#!/usr/bin/env bash
# One GPU-machine call: build, CUDA tests under compute-sanitizer, kernel and model benchmarks
# with the PyTorch peers beside them. Run from the repository root on the device:
#   source .device/env.sh; scripts/device_bench.sh
set -uo pipefail
source scripts/device_env.sh
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader
make -s cpu cuda || exit 1
tests="test/cuda_test.ts test/cuda_kvq_test.ts"
deno test -A --cached-only $tests 2>&1 | grep -E "ok|FAIL|error|passed|failed" | tail -30
echo "== compute-sanitizer memcheck over the CUDA tests"
compute-sanitizer --tool memcheck --leak-check no deno test -A --cached-only $tests 2>&1 | grep -E "ERROR SUMMARY|passed|failed|Invalid" | head -10
echo "== kernels"
deno run -A --cached-only cli.ts bench --kernels --device cuda -r 5
# the peers (copies of ../shared/peers in .cache/peers): PyTorch SDPA flash, and KIVI's kernels
if [ -z "${NO_PEERS:-}" ]; then
  [ -f .cache/peers/torch_decode_attn_peer.py ] && OUT="$out" python3 .cache/peers/torch_decode_attn_peer.py 2>&1 | tail -12
  [ -f .cache/peers/kivi_peer.py ] && (cd .cache/peers && OUT="$out" python3 kivi_peer.py 2>&1 | tail -12)
fi
echo "== models"
for shape in ${SHAPES:-llama3-8b}; do
  dir=/tmp/models/$shape
  [ -f "$dir/config.json" ] || deno run -A --cached-only scripts/random_model.ts --shape "$shape" --shards 4 "$dir"
  deno run -A --cached-only cli.ts bench --device cuda --model "$dir" ${BENCH_ARGS:--p 512,4096 -n 128 -d 0,4096,32768 -r 3}
  [ -z "${NO_PEERS:-}" ] && python3 bench/torch_reference.py "$dir" 512 4096 2>&1 | grep test
done
