#!/usr/bin/env bash
# Makes a fresh checkout runnable and prints the path of the Deno to use:
# Deno from npm into .tools/ when `deno` is not on PATH, the npm packages
# (node_modules, pinned by deno.lock), and the kernel library (CUDA too where
# nvcc exists). Everything it prints except the final path goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deno_version=2.9.6

if command -v deno >/dev/null 2>&1; then
  deno="$(command -v deno)"
else
  deno="$root/.tools/node_modules/.bin/deno"
  if [ ! -x "$deno" ]; then
    echo "innerq: installing Deno $deno_version from npm into .tools/" >&2
    mkdir -p "$root/.tools"
    [ -f "$root/.tools/package.json" ] || echo '{ "name": "innerq-tools", "private": true }' >"$root/.tools/package.json"
    npm install --prefix "$root/.tools" --no-audit --no-fund --silent "deno@$deno_version" >&2
  fi
fi

cd "$root"
if [ ! -d node_modules ] || [ deno.lock -nt node_modules ]; then
  echo "innerq: installing npm packages" >&2
  "$deno" install --quiet >&2
  touch node_modules
fi
make -s cpu >&2
if command -v nvcc >/dev/null 2>&1; then make -s -j"$(nproc)" cuda >&2; fi
echo "$deno"
