#!/bin/bash
# On a machine with a GPU (e.g. the device tool): build the CUDA extension in place, compare every
# native CUDA op with the CPU op (check_all.py), run the GPU tests, then compute-sanitizer memcheck
# (SAN=0 skips it) and racecheck (RACE=1), and BENCH=1 the packed_linear table. Logs go to $OUT.
# Used on an H200 on 2026-12-04 (README "What is in it"); SKIP_BUILD=1 reuses a build.
# Exit status 1 if the build failed (nothing else runs: the stages would test an older .so) or if
# any stage failed; each stage still runs, so one call shows every failure.
set -o pipefail
FAIL=0
stage() { local rc=$1; shift; echo "$* rc=$rc at $(( $(date +%s) - T0 )) s"; [ "$rc" = 0 ] || FAIL=1; }
cd "$(dirname "$0")/../.." || exit 1
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
T0=$(date +%s)
nvidia-smi -L; python3 -c 'import torch;print(torch.__version__, torch.version.cuda)'; nvcc --version | tail -1
if [ "${SKIP_BUILD:-0}" != 1 ]; then
QUANTKERN_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} python3 setup.py --quiet build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc in $(( $(date +%s) - T0 )) s"; grep -i -m20 "error" "$OUT/build.log"
[ "$rc" = 0 ] || exit 1
fi
export PYTHONUNBUFFERED=1
timeout 200 python3 scripts/gpu_check/check_all.py 2>&1 | tee "$OUT/check.log" | tail -60
stage $? check
timeout "${PYT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_fake_quant_lsq_cuda.py tests/test_oscillation.py tests/test_hqq.py tests/test_packed_linear.py tests/test_calibrate.py tests/test_quantize.py tests/test_ptq_conv.py -k "cuda or gpu" 2>&1 | tee "$OUT/pytest.log" | tail -25
stage $? pytest
# the compiled Triton packed_linear kernels (the tests above run Triton in the interpreter)
TRITON_INTERPRET=0 timeout "${TRT:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_packed_linear.py -k "triton_gpu" 2>&1 | tee "$OUT/triton.log" | tail -15
stage $? triton
if [ "${SAN:-1}" = 1 ]; then
SMALL=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANT:-150}" compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 python3 scripts/gpu_check/check_all.py > "$OUT/memcheck.log" 2>&1
stage $? memcheck; grep -m30 -E "Invalid|ERROR SUMMARY|DONE|FAIL|at 0x|by thread" "$OUT/memcheck.log"
fi
if [ "${RACE:-0}" = 1 ]; then
SMALL=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${RACET:-90}" compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 python3 scripts/gpu_check/check_all.py > "$OUT/racecheck.log" 2>&1
stage $? racecheck; grep -m30 -E "hazard|Race|ERROR SUMMARY|RACECHECK SUMMARY|DONE|FAIL" "$OUT/racecheck.log"
fi
if [ "${BENCH:-0}" = 1 ]; then
timeout "${BENCHT:-200}" python3 -m benchmarks.bench_packed_linear --device cuda --shapes 4096x11008,4096x4096 --m 1,8,32,128 --bits 4,3,2 --groups 64 --dtype bfloat16 --budget 0.1 --reps 20 --no-plot > "$OUT/bench.txt" 2>&1
stage $? bench; tail -60 "$OUT/bench.txt"
fi
exit $FAIL
