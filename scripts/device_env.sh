# Sourced at the start of a command on the GPU machine (after .device/env.sh): where CUDA's
# libraries are, and Deno kept offline.
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export DENO_NO_UPDATE_CHECK=1 NO_COLOR=1
