#!/usr/bin/env bash
# Proves the CUDA build without a GPU (DESIGN.md section 5).
#
# 1. A separate venv (.venv-cuda, reused when complete) with the CUDA 13 build
#    of torch, so the CPU venv (.venv, torch+cpu) is never touched. The CPU
#    wheel's CUDA headers are incomplete, so a real nvcc build needs this one.
# 2. The source tree is copied to a temp dir and built there in place: the CPU
#    build's quantkern/_C*.so in the repo is never overwritten.
# 3. tests/check_cuda_build.py loads that build and checks that every native op
#    has a CUDA and a CPU kernel registered. No GPU is needed for any of this.
#
# Usage: bash .ci/cuda_build.sh        (env: PYTHON, QK_CUDA_VENV, KEEP_BUILD=1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${QK_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_SPEC="torch==2.14.1"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
start=$(date +%s)

[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "cuda_build: no nvcc at $CUDA_HOME/bin/nvcc" >&2; exit 1; }

# --- 1. the venv: the stamp is written last, so a half-made venv is redone.
stamp="$VENV/.quantkern-cuda-venv"
want="$TORCH_SPEC numpy ninja setuptools"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "== creating $VENV ($want)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # Only these four packages (and torch's own dependencies) are installed; the
  # project itself is never pip-installed here, so nothing can pull another torch.
  # (pip's warnings about this machine's flat local indexes are filtered out.)
  "$VENV/bin/pip" install --quiet $want 2>&1 | { grep -v 'is neither a file nor a directory' || true; }
  echo "$want" > "$stamp"
fi
PY="$VENV/bin/python"
"$PY" - <<'PYEOF'
import torch
assert torch.__version__.split("+")[0] == "2.14.1" and torch.version.cuda, \
    f"cuda_build: expected the CUDA build of torch 2.14.1, got {torch.__version__} (cuda {torch.version.cuda})"
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

# The pip CUDA wheels carry the headers/libraries that torch's CUDA headers
# need (cuda_runtime_api.h etc. for the toolkit's version) under nvidia/cu13.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"
[[ -d "$CU/include" && -d "$CU/lib" ]] || { echo "cuda_build: missing $CU/include or $CU/lib" >&2; exit 1; }

# --- 2. build a copy of the tree (tracked and untracked files, no venvs, no builds).
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/quantkern-cuda-build.XXXXXX")"
if [[ "${KEEP_BUILD:-0}" != 1 ]]; then trap 'rm -rf "$BUILD"' EXIT; fi
tar -C "$ROOT" --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.egg-info' \
    --exclude='*.so' --exclude=__pycache__ --exclude=.pytest_cache -cf - . | tar -C "$BUILD" -xf -
echo "== building in $BUILD"
(
  cd "$BUILD"
  QUANTKERN_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0+PTX;9.0a" MAX_JOBS="${MAX_JOBS:-2}" \
  CPATH="$CU/include${CPATH:+:$CPATH}" LIBRARY_PATH="$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}" \
    "$PY" setup.py --quiet build_ext --inplace
)

# --- 3. load it and check the registrations.
( cd "$BUILD" && PYTHONPATH="$BUILD" "$PY" tests/check_cuda_build.py )
echo "== cuda_build: OK in $(( $(date +%s) - start )) s"
