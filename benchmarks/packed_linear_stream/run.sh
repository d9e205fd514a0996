#!/usr/bin/env bash
# Build the stream experiments of RESULTS_packed_linear.md and run one comparison:
#   [AMX_GEMV=1] bash benchmarks/packed_linear_stream/run.sh [BITS] [HEADERS_DIR ...]
# Each HEADERS_DIR (default: csrc/cpu of this checkout) is a copy of the kernel headers to
# time against the others (A/B of a change; a copy of csrc/cpu with csrc/shared next to it, since
# the headers include ../shared/). Pin to a core for 1-thread runs: taskset -c 1 bash ...
# HOTLOOP=1: the hot-weight A/B instead (hot_driver.cpp: x prepared once, cycles per 256 weights;
# env M, K, N, GS, REPS, R as documented there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/qk_stream}
mkdir -p "$out"
bits=${1:-4}
shift || true
dirs=("$@")
[ ${#dirs[@]} -eq 0 ] && dirs=("$root/csrc/cpu")
cxx="g++ -O3 -std=c++20 -fPIC -shared"
kernel() {  # kernel.cpp against header copy $1, to $2
  $cxx -ffp-contract=off -fno-math-errno -I"$1" -I"$root/csrc/cpu" -o "$2" "$here/kernel.cpp" "$root/csrc/cpu/cpu_features.cpp"
}
if [ "${HOTLOOP:-0}" = 1 ]; then
  g++ -O2 -o "$out/hot_driver" "$here/hot_driver.cpp" -ldl
  libs=()
  for i in "${!dirs[@]}"; do
    kernel "${dirs[$i]}" "$out/hot_kernel$i.so"
    libs+=("$out/hot_kernel$i.so")
  done
  exec "$out/hot_driver" "$bits" "${libs[@]}"
fi
g++ -O2 -fopenmp -o "$out/driver" "$here/driver.cpp" -ldl
$cxx -DWORK=0 -o "$out/read_prefetch.so" "$here/stream.cpp"
$cxx -DWORK=0 -DSTREAMS=4 -o "$out/read_4streams.so" "$here/stream.cpp"
$cxx -DWORK=1 -o "$out/int4_work.so" "$here/stream.cpp"
$cxx -DWORK=1 -DMETA=1 -o "$out/int4_work_meta.so" "$here/stream.cpp"
libs=()
for i in "${!dirs[@]}"; do
  kernel "${dirs[$i]}" "$out/kernel$i.so"
  libs+=("$out/kernel$i.so")
done
# AMX_GEMV=1: also the AMX-int8 GEMV experiment (amx_gemv.cpp; int4 / int2, g64, K % 512 == 0)
if [ "${AMX_GEMV:-0}" = 1 ]; then
  $cxx -ffp-contract=off -o "$out/amx_gemv.so" "$here/amx_gemv.cpp"
  libs+=("$out/amx_gemv.so")
fi
# the synthetic work streams model the int4 row layout (K / 2 bytes a row): int4 only
synth=("$out/read_prefetch.so" "$out/read_4streams.so")
[ "$bits" = 4 ] && synth+=("$out/int4_work.so" "$out/int4_work_meta.so")
"$out/driver" "$bits" "${libs[@]}" "${synth[@]}"
