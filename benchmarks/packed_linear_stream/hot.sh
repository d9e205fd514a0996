#!/usr/bin/env bash
# Hot-weight A/B of the GEMV (hot_driver.cpp), the counterpart of run.sh's cold one:
#   [M=4 K=.. N=..] taskset -c 1 bash benchmarks/packed_linear_stream/hot.sh [BITS] [HEADERS_DIR ...]
# Each HEADERS_DIR (default: csrc/cpu of this checkout) is a copy of csrc/cpu with csrc/shared
# next to it (the headers include ../shared/).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/qk_stream}
mkdir -p "$out"
bits=${1:-4}
shift || true
dirs=("$@")
[ ${#dirs[@]} -eq 0 ] && dirs=("$root/csrc/cpu")
g++ -O2 -o "$out/hot_driver" "$here/hot_driver.cpp" -ldl
libs=()
for i in "${!dirs[@]}"; do
  g++ -O3 -std=c++20 -fPIC -shared -ffp-contract=off -fno-math-errno -I"${dirs[$i]}" -o "$out/hot_kernel$i.so" \
    "$here/kernel.cpp" "$root/csrc/cpu/cpu_features.cpp"
  libs+=("$out/hot_kernel$i.so")
done
"$out/hot_driver" "$bits" "${libs[@]}"
