#!/usr/bin/env bash
# Runs the CPU kernels' tests under AddressSanitizer + UndefinedBehaviorSanitizer: builds the
# committed tree (git archive HEAD) in a temporary folder with QUANTKERN_SANITIZE=1 (see setup.py)
# using the set-up venv (.venv: bash scripts/setup.sh first), then runs the kernel test files with
# the sanitizer runtimes preloaded. Exit status 1 if a sanitizer reported anything in quantkern.
# About 5 min to build and 3.5 min to test on 2 cores (1314 tests). Extra arguments go to pytest (e.g. -k int3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d /tmp/quantkern-sanitize.XXXXXX)
git archive HEAD | tar -x -C "$TMP"
cd "$TMP"
QUANTKERN_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} "$ROOT/.venv/bin/python" setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -20 build.log; exit 1; }
# A -k of the caller's joins this script's filter (pytest keeps only the last -k: `-k int3` ran the
# Triton and nvcc tests under the sanitizers too)
KEXPR="not triton and not nvcc"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -k) KEXPR="$KEXPR and ($2)"; shift 2 ;;
    -k*) KEXPR="$KEXPR and (${1#-k})"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
# -s: pytest would swallow the runtime-error lines of tests that pass; the CPU cache off so that
# large buffers go through the allocator ASan watches
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 QUANTKERN_CPU_CACHE_MB=0 \
PYTHONPATH="$TMP" "$ROOT/.venv/bin/python" -m pytest -q -s -p no:cacheprovider \
  tests/test_packing.py tests/test_packed_linear.py tests/test_packed_act.py tests/test_hqq.py \
  tests/test_calibrate.py tests/test_fake_quant_lsq.py tests/test_oscillation.py \
  -k "$KEXPR" ${ARGS[@]+"${ARGS[@]}"} > sanitize.log 2>&1 || { tail -20 sanitize.log; exit 1; }
tail -1 sanitize.log
if grep -E "runtime error|ERROR: AddressSanitizer" sanitize.log | grep -q "csrc/"; then
  grep -E -A3 "runtime error|ERROR: AddressSanitizer" sanitize.log | head -40
  echo "sanitizer reports in quantkern's code: $TMP/sanitize.log"
  exit 1
fi
echo "no sanitizer report in quantkern's code ($TMP/sanitize.log)"
