#!/usr/bin/env bash
# Builds the CUDA library with other decode-attention tunings and times each with
# `innerq bench --kernels`, on the GPU machine: scripts/sweep_decode.sh "8 64" "16 128" ...
# Each argument is "DEC_BLOCKS_PER_SM DEC_MIN_KEYS" (kernels/cuda/attention.cu).
set -euo pipefail
source scripts/device_env.sh
for cfg in "$@"; do
  set -- $cfg
  lib=/tmp/sweep/blocks$1-keys$2/libinnerq_cuda.so
  mkdir -p "$(dirname "$lib")"
  nvcc -O3 -std=c++17 -Xcompiler -fPIC -Ikernels -gencode arch=compute_90a,code=sm_90a -shared \
    -DDEC_BLOCKS_PER_SM="$1" -DDEC_MIN_KEYS="$2" kernels/cuda/*.cu -o "$lib" -ldl
  echo "== blocks per SM $1, min keys $2"
  INNERQ_CUDA_LIB="$lib" deno run -A --cached-only cli.ts bench --kernels --device cuda -r 3 | grep attn
done
